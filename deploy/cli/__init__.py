"""The host-side `edgejit` commands, one module each (`add_arguments(p)` + `main(args)`); the table of all commands is edge.cli.COMMANDS."""
