"""`edgejit run`: one-shot inference on this machine, for trying an artifact by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edge.errors import InputError
from edge.runtime.signature import fill_defaults


def add_arguments(p) -> None:
    p.add_argument("artifact", help="artifact directory")
    p.add_argument(
        "--input", "-i", action="append", default=[], metavar="NAME=VALUE",
        help="an input: NAME=file.npy, or NAME=JSON list (e.g. input_ids=[[101,2023,102]]); "
        "masks and token types left out are filled with ones and zeros",
    )
    p.add_argument("--threads", type=int, help="worker threads (default: all cores)")
    p.add_argument("--trust", action="append", metavar="KEY", help="trusted public key file or directory: the artifact must be signed by one of them")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="run an unsigned artifact without the warning on every call (signatures that are present are still checked)")
    p.add_argument("--save", metavar="DIR", help="write each output to DIR/NAME.npy")


def parse_inputs(specs, pairs: list[str]) -> dict[str, np.ndarray]:
    given = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"--input '{pair}': expected NAME=VALUE")
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise InputError(f"unknown input '{name}' (the model takes: {', '.join(s.name for s in specs)})")
        if value.endswith(".npy"):
            try:
                given[name] = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"--input {name}: cannot read {value}: {e}") from None
        else:
            try:
                given[name] = np.asarray(json.loads(value), dtype=spec.dtype)
            except (ValueError, TypeError) as e:
                raise InputError(f"--input {name}: not a JSON array of {spec.dtype}: {e}") from None
    return fill_defaults(specs, given)


def main(args) -> int:
    from edge.runtime.tvm_library import load_tvm

    load_tvm()
    from edge.runtime.runtime import Runtime

    trust = args.trust
    if getattr(args, "allow_unsigned", False):
        from edge.artifact.trust import Trust

        trust = Trust(Trust.load(args.trust).keys, allow_unsigned=True, quiet=True)
    rt = Runtime(args.artifact, threads=args.threads, trust=trust)
    inputs = parse_inputs(rt.inputs, args.input)
    outs = rt.run(inputs)
    for spec, out in zip(rt.outputs, outs):
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save) / f"{spec.name}.npy", out)
        flat = out.reshape(-1)
        preview = np.array2string(flat[:8], precision=5, separator=", ")
        print(f"{spec.name}: shape {list(out.shape)} {out.dtype} {preview}{' ...' if flat.size > 8 else ''}")
    sys.stdout.flush()
    return 0
