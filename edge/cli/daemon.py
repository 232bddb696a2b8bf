"""`edgejit daemon`: run the on-device inference service (see docs/daemon.md)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from edge import configs
from edge.serve.config import ConfigError, ModelConfig, load_config, parse_config

DEFAULT_CONFIG = Path("/etc/edgejit/daemon.toml")

# journald reads a "<N>" syslog priority prefix on each line and adds its own timestamps.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record):
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("edgejit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    if level != "debug":  # one line per request is too much for an operator's log
        logging.getLogger("edgejit.daemon.access").setLevel(logging.WARNING)


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", help=f"daemon config file (TOML; default: {DEFAULT_CONFIG}; example: {configs.PACKAGE_DIR / 'daemon.toml'})")
    p.add_argument("--model", "-m", action="append", default=[], metavar="NAME=ARTIFACT",
                   help="serve this artifact too (or instead of a config file); repeatable")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [server] host and port")
    p.add_argument("--trusted-keys", action="append", metavar="PATH", help="add a trusted public key file or directory ([runtime] trusted_keys)")
    p.add_argument("--allow-unsigned", action="store_true", help="load unsigned artifacts, with a warning ([runtime] allow_unsigned)")
    p.add_argument("--allow-remote-without-token", action="store_true",
                   help="listen beyond loopback with no admin token ([server] allow_remote_without_token); refused otherwise")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override [log] level")


def build_config(args):
    path = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() and not args.model else None)
    cfg = load_config(path) if path else parse_config({"jit": {}}, base=Path.cwd())  # no file: JIT with the default policy
    models = {m.name: m for m in cfg.models}
    for pair in args.model:
        name, sep, artifact = pair.partition("=")
        if not sep:
            name, artifact = Path(pair).name, pair
        extra = parse_config({"models": [{"name": name, "artifact": artifact}]}, base=Path.cwd()).models[0]
        models[extra.name] = ModelConfig(extra.name, extra.artifact)
    changes = {"models": tuple(models.values())}
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--listen '{args.listen}': expected HOST:PORT, e.g. 127.0.0.1:8765")
        changes["server"] = dataclasses.replace(cfg.server, host=host or "127.0.0.1", port=int(port))
    if args.allow_remote_without_token:
        changes["server"] = dataclasses.replace(changes.get("server", cfg.server), allow_remote_without_token=True)
    if args.log_level:
        changes["log_level"] = args.log_level
    if args.trusted_keys:
        changes["trusted_keys"] = cfg.trusted_keys + tuple(Path(k).resolve() for k in args.trusted_keys)
    if args.allow_unsigned:
        changes["allow_unsigned"] = True
    cfg = dataclasses.replace(cfg, **changes)
    if not cfg.models:
        raise ConfigError(f"nothing to serve: pass --config FILE (see {configs.PACKAGE_DIR / 'daemon.toml'}) or --model NAME=ARTIFACT")
    return cfg


def main(args) -> int:
    from edge.jit.policy import resolve
    from edge.runtime.tvm_library import load_tvm, needs_compiler

    cfg = build_config(args)
    setup_logging(cfg.log_level)
    load_tvm(compiler=needs_compiler(resolve(cfg.jit) if cfg.jit is not None else None))
    from edge.serve.service import Daemon

    logging.getLogger("edgejit.daemon").info(
        "edgejit daemon starting (pid %d, config %s, %d model(s))", os.getpid(), cfg.path or "command line", len(cfg.models)
    )
    return Daemon(cfg).run()
