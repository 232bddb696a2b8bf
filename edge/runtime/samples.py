"""Plausible inputs for a language model, made from its signature: token ids within the
vocabulary, all-ones attention masks, zero token types, 0..n-1 position ids. Used where the host
needs inputs and has none of the user's: the padding check, synthetic int8 calibration samples,
the ARM comparison."""

from __future__ import annotations

import numpy as np

from edge.artifact.reader import TensorSpec


def sample_inputs(inputs: list[TensorSpec], dims: dict[str, int], seed=0) -> dict[str, np.ndarray]:
    """One set of inputs; `dims` gives the value of every symbolic dim; `seed` may be a numpy Generator."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in inputs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in s.shape)
        lname = s.name.lower()
        if np.issubdtype(np.dtype(s.dtype), np.integer) or s.dtype == "bool":
            if "mask" in lname:
                a = np.ones(shape)
            elif "type" in lname or "segment" in lname:
                a = np.zeros(shape)
            elif "position" in lname:
                a = np.broadcast_to(np.arange(shape[-1]), shape)
            else:
                lo, hi = s.range or (1, 15)  # without a known vocabulary: any vocabulary has 16 ids
                a = rng.integers(lo, hi + 1, size=shape)
            out[s.name] = np.ascontiguousarray(a.astype(s.dtype))
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


def single_batch_dims(inputs: list[TensorSpec], length: int) -> dict[str, int]:
    """Batch (a symbolic dim 0) of 1, every other symbolic dim `length`."""
    dims = {d: length for s in inputs for d in s.shape if isinstance(d, str)}
    dims.update({s.shape[0]: 1 for s in inputs if s.shape and isinstance(s.shape[0], str)})
    return dims


def token_inputs(names: list[str], seq: int, *, vocab: int = 16, seed=0, dtype: str = "int64") -> dict[str, np.ndarray]:
    """Batch-1 inputs of length `seq` for a language model whose inputs are the integer tensors
    `names` [batch, seq] (token ids below `vocab`, masks, token types, positions); `seed` may be a
    numpy Generator."""
    return sample_inputs([TensorSpec(n, dtype, (1, seq), (0, vocab - 1)) for n in names], {}, seed)
