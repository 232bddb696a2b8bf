"""CPU kernels: weight layouts and schedule rules for transformer operators (docs/kernels.md).

`optimize` runs at build time on the Relax module (params are function inputs, shapes possibly
symbolic): it swaps matmuls against packed weights for the packed dense kernel and softmax for
its chunked kernel, legalizes and fuses the graph, then schedules every PrimFunc that is not
already scheduled.
"""

from __future__ import annotations

from .target import tile_rows, vector_lanes


def optimize(mod, target, *, tuning_dir=None):
    """Relax/TIR passes that make the module fast on `target`; returns the module to compile.

    The result is already legalized and fused: compile it with `relax_pipeline()`.
    """
    import tvm
    from tvm import relax

    from . import graph, packing, rules

    with target:
        mod = packing.rewrite_packed_dense(mod, tile_rows(target))
        mod = graph.expand_small_powers(mod)
        mod = graph.rewrite_softmax(mod, vector_lanes(target))
        # erf/exp/tanh legalized as vectorizable polynomials (GELU, softmax) instead of libm
        # calls; called directly because inside a Sequential its opt_level (4) would skip it
        mod = relax.transform.FastMathTransform()(mod)
        mod = tvm.transform.Sequential(
            [
                relax.backend.DispatchSampling(),
                relax.backend.DispatchSortScan(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )(mod)
        if tuning_dir is not None:
            from ..errors import EdgeJitError

            raise EdgeJitError("tuning records are not supported yet (docs/kernels.md)")
        mod = rules.schedule_module(mod, target)
    return mod


def relax_pipeline(target):
    """What tvm.compile still has to do after `optimize`: lower dataflow and finalize."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
            )(mod)

    return _pipeline
