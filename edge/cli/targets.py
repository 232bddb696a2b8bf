"""`edgejit targets`: list the target presets and whether this machine can run each."""

from __future__ import annotations

import json

from edge.artifact.targets import host_preset, load_presets


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the presets as JSON")


def main(args) -> int:
    presets = load_presets()
    if args.json:
        print(json.dumps({n: p.target for n, p in presets.items()}, indent=2))
        return 0
    best = host_preset(presets).name
    width = max(map(len, [*presets, "PRESET"]))
    print(f"{'PRESET':<{width}}  {'ARCH':<8} {'HERE':<9} DESCRIPTION")
    for name, p in presets.items():
        mark = "host" if name == best else ("runs here" if p.runs_here() else "")
        print(f"{name:<{width}}  {p.arch:<8} {mark:<9} {p.description}")
    print(f"\n'host' selects {best} on this machine.")
    return 0
