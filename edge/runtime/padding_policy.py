"""Right-padding of inputs to a bucket length and slicing of the outputs back (see deploy/compiler/padding_check.py
for how the host decides that a model's results survive it)."""

from __future__ import annotations

import numpy as np

from edge.artifact.reader import TensorSpec


def pad_inputs(inputs: list[TensorSpec], arrays: list[np.ndarray], seq: str, length: int) -> list[np.ndarray]:
    """Right-pad every seq axis of every input with zeros (for mask inputs 0 means masked out)."""
    padded = []
    for s, a in zip(inputs, arrays):
        widths = [(0, length - a.shape[i]) if d == seq else (0, 0) for i, d in enumerate(s.shape)]
        padded.append(np.pad(a, widths) if any(w[1] for w in widths) else a)
    return padded


def slice_outputs(outputs: list[TensorSpec], arrays: list[np.ndarray], seq: str, length: int) -> list[np.ndarray]:
    out = []
    for s, a in zip(outputs, arrays):
        index = tuple(slice(0, length) if d == seq else slice(None) for d in s.shape)
        out.append(np.ascontiguousarray(a[index]))
    return out
