"""Host-side Relax rewrites before the build: precision, weight layouts (see edge/kernels)."""

from __future__ import annotations


def prepare(mod, params, target, *, precision: str = "fp32", quant=None):
    """Return (module ready for edge.runtime.pipeline.build, params in the layout that module expects).

    The parameter transforms run here, once, over the real weights; the device only loads them.
    """
    from edge.errors import EdgeJitError
    from edge.kernels import packing

    if precision not in ("fp32", "int8"):
        raise EdgeJitError(f"precision '{precision}' is not supported (use fp32 or int8)")
    if precision == "int8":
        # int8 matmuls against weights (deploy/quantize/int8/scheme.py; `quant` is its QuantOptions); the
        # matmuls it leaves in float are packed below like any fp32 model's.
        from deploy.quantize.int8 import scheme as quantize

        mod, params = quantize.quantize(mod, params, target, quant)
    # fp32 matmuls against weights: pack the weights into [N/16, K, 16] panels (edge/kernels/dense.py)
    return packing.pack_matmul_weights(mod, params)
