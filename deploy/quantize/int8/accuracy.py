"""Accuracy of a quantized module against the fp32 model, measured at compile time.

The reference is the ONNX model itself evaluated by `onnx.reference` (the spec, not an optimized
runtime). Encoders are compared on their pooled embeddings (mean of the first output over the
attended positions, or the output itself when it is already [batch, hidden]); decoders (first
output [batch, seq, vocab]) on the top-1 agreement of the next-token logits at every attended
position.
"""

from __future__ import annotations

import numpy as np

from edge.errors import EdgeJitError
from edge.runtime.module import flatten_outputs

DEFAULT_MIN = {"encoder": 0.99, "decoder": 0.90}
METRIC = {"encoder": "cosine_mean", "decoder": "top1_agreement"}


class AccuracyError(EdgeJitError):
    """The quantized module is less accurate than the threshold."""


def model_kind(outputs, inputs) -> str:
    vocab = None
    for s in inputs:
        if s.name == "input_ids" and s.range:
            vocab = s.range[1] + 1
    first = outputs[0].shape
    if len(first) == 3 and isinstance(first[-1], int) and vocab is not None and first[-1] == vocab:
        return "decoder"
    return "encoder"


def reference_outputs(model, samples: list[dict]) -> list[list[np.ndarray]]:
    from onnx.reference import ReferenceEvaluator

    try:
        ev = ReferenceEvaluator(model)
    except RuntimeError:
        # onnx.reference implements some ops only at newer opsets (DequantizeLinear from 19)
        from onnx import version_converter

        ev = ReferenceEvaluator(version_converter.convert_version(model, 21))
    return [[np.asarray(o) for o in ev.run(None, s)] for s in samples]


def _pooled(out: np.ndarray, sample: dict) -> np.ndarray:
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 3:
        mask = sample.get("attention_mask")
        m = np.ones(out.shape[:2]) if mask is None else np.asarray(mask, dtype=np.float64)
        return (out * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    return out.reshape(out.shape[0], -1)


def _positions(logits: np.ndarray, sample: dict) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    mask = sample.get("attention_mask")
    keep = np.ones(logits.shape[:2], bool) if mask is None else np.asarray(mask) > 0
    return logits[keep]


def _errors(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return {
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


def compare(kind: str, samples: list[dict], ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict:
    """Metrics of `got` against `ref` (lists of outputs per sample)."""
    if kind == "decoder":
        # every attended position's logits predict a next token: compare them all
        a = np.concatenate([_positions(r[0], s) for r, s in zip(ref, samples)])
        b = np.concatenate([_positions(g[0], s) for g, s in zip(got, samples)])
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
        return {"kind": kind, "samples": len(samples), "metric": METRIC[kind], "value": top1, "next_token_logits": _errors(a, b)}
    a = np.concatenate([_pooled(r[0], s) for r, s in zip(ref, samples)])
    b = np.concatenate([_pooled(g[0], s) for g, s in zip(got, samples)])
    e = _errors(a, b)
    return {"kind": kind, "samples": len(samples), "metric": METRIC[kind], "value": e["cosine_mean"], "pooled": e}


def check(report: dict, min_accuracy: float | None, accept: bool) -> dict:
    """Set the threshold in `report`; raise AccuracyError when below it and not accepted."""
    threshold = DEFAULT_MIN[report["kind"]] if min_accuracy is None else float(min_accuracy)
    report["threshold"] = threshold
    below = report["value"] < threshold
    report["below_threshold"] = bool(below)
    if below and not accept:
        raise AccuracyError(
            f"int8 accuracy below threshold: {report['metric']} {report['value']:.6f} < {threshold:.6f} "
            f"(short by {threshold - report['value']:.6f}); keep more ops in float (--keep-float), lower "
            f"--min-accuracy, or pass --accept-accuracy to write it anyway"
        )
    return report


class HostRunner:
    """Build a Relax module (params as trailing inputs) for this machine and run it on samples."""

    def __init__(self, mod, params, target: dict):
        import tvm
        from tvm import relax

        from edge.runtime import pipeline as edge_build

        self.ex = edge_build.build(mod, target)
        self.vm = relax.VirtualMachine(self.ex, tvm.cpu())
        self.params = [tvm.runtime.tensor(np.require(p, requirements="C")) for p in params]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        out = self.vm["main"](*[tvm.runtime.tensor(np.require(a, requirements="C")) for a in arrays], *self.params)
        return flatten_outputs(out)
