"""The `edgejit` command: the COMMANDS table and main(). Each subcommand lives in its own module
(edge/cli/* on the device, deploy/cli/* on the build host), which provides
`add_arguments(parser)` and `main(args) -> int`; host-side ones are imported only when used, so
the device needs none of the compiler's dependencies."""

from __future__ import annotations

import argparse
import importlib
import sys

from edge.errors import EdgeJitError

# name -> (module, one-line help). Host-side modules live in deploy/.
COMMANDS = {
    "compile": ("deploy.cli.compile", "compile an ONNX or GGUF model into an artifact for a target preset"),
    "example": ("deploy.cli.example", "write the bundled example model (all-MiniLM-L6-v2) to a directory"),
    "keygen": ("deploy.cli.keygen", "make an Ed25519 key pair for signing artifacts (compile --sign)"),
    "run": ("edge.cli.run", "run an artifact once on this machine"),
    "generate": ("edge.cli.generate", "generate a reply to one prompt with a decoder artifact, streamed to stdout"),
    "chat": ("edge.cli.chat", "chat with a decoder artifact in the terminal"),
    "daemon": ("edge.cli.daemon", "serve artifacts over a local HTTP API with the JIT (see docs/daemon.md)"),
    "demo": ("deploy.cli.demo", "run the whole system on this machine: compile, broker, coordinator, daemon, traffic, report"),
    "targets": ("edge.cli.targets", "list the target presets"),
    "coordinator": ("deploy.cli.coordinator", "collect a fleet's MQTT telemetry into SQLite (see docs/telemetry.md)"),
    "fleet": ("deploy.cli.fleet", "report fleet latency, JIT and device state from coordinator databases"),
}


HOST_PACKAGES = ("onnx", "onnxruntime", "onnxscript", "torch", "transformers", "gguf")


def _host_only(name: str, e: ModuleNotFoundError) -> EdgeJitError | None:
    if COMMANDS[name][0].startswith("deploy") and (e.name or "").split(".")[0] in HOST_PACKAGES:
        return EdgeJitError(f"'{name}' runs on the build host and needs {e.name}: pip install 'edgejit[host]'")
    return None


def _module(name: str):
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        raise _host_only(name, e) or e from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="edgejit", description="Edge-device JIT runtime for language models on Apache TVM")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            try:
                _module(name).add_arguments(p)
            except EdgeJitError as e:
                print(f"edgejit: error: {e}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    try:
        try:
            return int(_module(args.command).main(args) or 0)
        except ModuleNotFoundError as e:  # host packages are imported lazily, when first needed
            raise _host_only(args.command, e) or e from None
    except EdgeJitError as e:
        if args.verbose:
            raise
        print(f"edgejit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgejit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
