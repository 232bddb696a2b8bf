"""Target presets: named TVM targets for the boards we support, kept as data in targets.json
(edge/configs/, or $EDGEJIT_CONFIG_DIR: see edge.configs.find)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge import configs, machine
from edge.errors import TargetError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    arch: str
    target: dict
    requires: list[str] = field(default_factory=list)
    vector_bits: int = 128
    linker: str | None = None

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def runs_here(self) -> bool:
        return self.arch == machine.arch() and not machine.missing_features(self.requires)

    def check_linker(self) -> None:
        """Cross targets need their linker on this machine to write the module's shared library."""
        import shutil

        if self.linker and shutil.which(self.linker) is None:
            raise TargetError(
                f"target {self.name} needs the aarch64 linker '{self.linker}': install the Debian package gcc-aarch64-linux-gnu"
            )


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    path = path or configs.find("targets.json")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot read target presets {path}: {e}") from None
    return {name: Preset(name=name, **spec) for name, spec in data["presets"].items()}


def host_preset(presets: dict[str, Preset] | None = None) -> Preset:
    """The fastest preset this machine can run (most required features satisfied)."""
    presets = presets or load_presets()
    usable = [p for p in presets.values() if p.runs_here()]
    if not usable:
        raise TargetError(f"no target preset matches this machine ({machine.arch()})")
    return max(usable, key=lambda p: (len(p.requires), p.vector_bits))


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name == "host":
        return host_preset(presets)
    try:
        return presets[name]
    except KeyError:
        raise TargetError(
            f"unknown target preset '{name}' (known: host, {', '.join(sorted(presets))})"
        ) from None
