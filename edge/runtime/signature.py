"""Checks inference inputs against the artifact's signature and resolves the symbolic dims."""

from __future__ import annotations

import numpy as np

from edge.artifact.manifest import DimRange, TensorSpec
from edge.errors import InputError


def bind_inputs(
    specs: list[TensorSpec], inputs, dims: dict[str, DimRange]
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Order `inputs` (a dict by name, or a list in signature order) and return them with the
    value of every symbolic dim, e.g. {"batch": 2, "seq": 37}. Raises InputError on any mismatch."""
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {s.name for s in specs})
        if unknown:
            raise InputError(
                f"unknown input '{unknown[0]}' (the model takes: {', '.join(s.name for s in specs)})"
            )
        missing = [s.name for s in specs if s.name not in inputs]
        if missing:
            raise InputError(f"missing input '{missing[0]}'")
        arrays = [inputs[s.name] for s in specs]
    else:
        arrays = list(inputs)
        if len(arrays) != len(specs):
            raise InputError(f"the model takes {len(specs)} inputs, got {len(arrays)}")
    values: dict[str, int] = {}
    out = []
    for spec, a in zip(specs, arrays):
        a = np.asarray(a)
        if a.dtype != np.dtype(spec.dtype):
            raise InputError(f"input '{spec.name}': dtype {a.dtype}, expected {spec.dtype}")
        if a.ndim != len(spec.shape):
            raise InputError(
                f"input '{spec.name}': rank {a.ndim} (shape {list(a.shape)}), expected rank {len(spec.shape)} {list(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(f"input '{spec.name}': dim {axis} is {got}, expected {want}")
                continue
            if values.setdefault(want, got) != got:
                raise InputError(
                    f"input '{spec.name}': dim {axis} ('{want}') is {got} but another input has {values[want]}"
                )
        if spec.range is not None and a.size:
            lo, hi = spec.range
            amin, amax = a.min(), a.max()
            if amin < lo or amax > hi:
                bad = amin if amin < lo else amax
                raise InputError(f"input '{spec.name}': value {bad} is outside [{lo}, {hi}] (e.g. a token id beyond the vocabulary)")
        out.append(a)
    for name, v in values.items():
        lim = dims.get(name) or DimRange()
        lo, hi = lim.min, lim.max
        if v < lo or (hi is not None and v > hi):
            raise InputError(f"'{name}' = {v} is outside the model's range [{lo}, {hi if hi is not None else '∞'}]")
    return out, values


def fill_defaults(specs: list[TensorSpec], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs left out: attention masks are all ones, token type (segment) ids all zeros, shaped
    like the first given input of the same rank. Anything else missing is left to bind_inputs."""
    if not arrays:
        return arrays
    ref = next(iter(arrays.values()))
    for s in specs:
        lname = s.name.lower()
        if s.name in arrays or np.ndim(ref) != len(s.shape):
            continue
        if "mask" in lname:
            arrays[s.name] = np.ones(np.shape(ref), dtype=s.dtype)
        elif "type" in lname or "segment" in lname:
            arrays[s.name] = np.zeros(np.shape(ref), dtype=s.dtype)
    return arrays
