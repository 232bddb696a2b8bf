"""Host-side Relax rewrites before the build: precision, weight layouts (see edge/kernels)."""

from __future__ import annotations


def prepare(mod, params, target, *, precision: str = "fp32"):
    """Return (module ready for edge.build.build, params in the layout that module expects).

    The parameter transforms run here, once, over the real weights; the device only loads them.
    """
    from edge.errors import EdgeJitError
    from edge.kernels import packing

    if precision not in ("fp32", "int8"):
        raise EdgeJitError(f"precision '{precision}' is not supported (use fp32 or int8)")
    if precision == "int8":
        # deploy/quantize.py hooks in here: it rewrites the int8 matmuls (and may leave fp32 ones).
        raise EdgeJitError("precision 'int8' is not supported yet")
    # fp32 matmuls against weights: pack the weights into [N/16, K, 16] panels (edge/kernels/dense.py)
    return packing.pack_matmul_weights(mod, params)
