"""Configuration data the device needs, shipped as package data: target presets (targets.json), the
default JIT policy (jit-policy.toml), the example daemon config and the systemd unit.

Look-up order for each file (`find`): the directory in $EDGEJIT_CONFIG_DIR when it holds the file,
then this package's copy. The repository's top-level `configs/` is a link to this folder."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "EDGEJIT_CONFIG_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent


def search_path() -> list[Path]:
    """The directories `find` looks in, in order."""
    env = os.environ.get(ENV)
    return [Path(env), PACKAGE_DIR] if env else [PACKAGE_DIR]


def find(name: str) -> Path:
    """The first `name` on the search path (the package's path when none has it, for the error)."""
    for d in search_path():
        if (d / name).is_file():
            return d / name
    return PACKAGE_DIR / name
