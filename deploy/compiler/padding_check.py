"""Decide at compile time whether a model's results survive right-padding of the sequence.

The JIT may serve a length L from a variant compiled for a bucket B > L by right-padding the
inputs and slicing the outputs. That is exact only for some models: encoders whose attention mask
hides the padding, and causal decoders (position i never sees positions > i). We do not trust the
input names alone: the padded and unpadded runs are compared with ONNX Runtime on the model itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.artifact.reader import TensorSpec
from edge.runtime.padding_policy import pad_inputs, slice_outputs

from edge.runtime.samples import sample_inputs

TOLERANCE = 1e-4  # relative to the output's scale


def check_padding(model_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], seq: str) -> dict:
    """Returns the manifest's "padding" entry: {"safe": bool, "mode": ..., "why": ...}."""
    for s in outputs:
        for d in s.shape:
            if isinstance(d, str) and d != seq and seq in d:
                return {"safe": False, "mode": "exact", "why": f"output {s.name} has a dim '{d}' derived from {seq}"}
    has_mask = any("mask" in s.name.lower() and seq in s.shape for s in inputs)
    mode = "attention_mask" if has_mask else "right"
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        dims = {d: 2 for s in inputs for d in s.shape if isinstance(d, str)}
        worst = 0.0
        for length, padded_len in ((5, 8), (3, 16)):
            dims[seq] = length
            x = sample_inputs(inputs, dims, seed=length)
            arrays = [x[s.name] for s in inputs]
            ref = sess.run(None, x)
            p = pad_inputs(inputs, arrays, seq, padded_len)
            got = slice_outputs(outputs, sess.run(None, {s.name: a for s, a in zip(inputs, p)}), seq, length)
            for r, g in zip(ref, got):
                if r.shape != g.shape:
                    return {"safe": False, "mode": "exact", "why": "padded outputs have another shape"}
                scale = max(1.0, float(np.abs(r).max()))
                worst = max(worst, float(np.abs(r.astype(np.float64) - g).max()) / scale)
    except Exception as e:  # the check is best-effort: an unrunnable model is not padded
        return {"safe": False, "mode": "exact", "why": f"could not check with ONNX Runtime: {str(e).splitlines()[0][:200]}"}
    if worst > TOLERANCE:
        return {"safe": False, "mode": "exact", "why": f"right-padding changes the outputs (rel. error {worst:.2e})"}
    return {"safe": True, "mode": mode, "why": f"checked with ONNX Runtime, rel. error {worst:.1e}"}
