"""CPU kernels: weight layouts and schedule rules for transformer operators (docs/kernels.md).

`optimize` runs at build time on the Relax module (params are function inputs, shapes possibly
symbolic): `lower` swaps matmuls against packed weights for the packed dense kernel and softmax
for its chunked kernel, legalizes and fuses the graph; then tuning records (when the artifact has
them) and the rules schedule every PrimFunc that is not already scheduled.
"""

from __future__ import annotations

from edge.kernels.target import decode_tile_rows, tile_rows, vector_lanes

# A decoder module's choice of activations for its matrix products on 4/8-bit weights (set by the
# host compile, honored by every build of the module: the generic one and the device JIT's variants
# alike). Modules compiled before prefill took them carry the old name, for their decode steps.
MATMUL_ACTIVATIONS_ATTR = "edgejit_matmul_activations"
_LEGACY_ATTR = "edgejit_decode_activations"
MATMUL_ACTIVATIONS = ("int8", "fp32")


def int8_matmuls(mod, target) -> str | None:
    """The instruction set `mod` multiplies quantized weights by int8 activations with on `target`
    (prefill, decode steps, the LM head; edge/kernels/dense_int8act.py): one of dense_int8act.ISAS
    when asked for at compile time and the target has int8 dot products, else None.
    Modules without the attribute keep fp32."""
    from edge.kernels import dense_int8act

    attrs = mod.attrs or {}
    asked = attrs.get(MATMUL_ACTIVATIONS_ATTR, attrs.get(_LEGACY_ATTR, "fp32"))
    return dense_int8act.isa(target) if str(asked) == "int8" else None


def optimize(mod, target, *, tuning=None):
    """Relax/TIR passes that make the module fast on `target`; returns the module to compile.

    `tuning` (edge.runtime.tuning_records.TuningRecords) schedules the PrimFuncs it has records for; the rules
    schedule the rest. The result is already legalized and fused: compile it with
    `relax_pipeline()`.
    """
    from edge.kernels import rules

    mod = lower(mod, target)
    with target:
        if tuning is not None:
            mod = tuning.apply(mod)
        return mark_noalias(rules.schedule_module(mod, target))


def mark_noalias(mod):
    """Every PrimFunc marked `tirx.noalias` (its buffer arguments never overlap).

    TVM 0.27's LLVM code generator applies the noalias flag of the module's last function (in
    name order) to the bodies of all of them: one function without it (TVM's KV-cache kernels
    `merge_state_inplace_cpu`, `tree_attn_paged_kv_cpu`, ... have none) and every kernel loses its
    alias information, so LLVM keeps the dense register tiles in memory. Measured: the 193-token
    prefill's 576 x 3072 4-bit dense 11.4 ms in the generic module vs 4.2 ms compiled alone.
    TVM's KV-cache kernels take distinct tensors (or non-overlapping read-only views of one
    auxiliary buffer), so the flag is true of them too."""
    from tvm import tirx

    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.noalias", False)):
            mod[gv] = func.with_attr("tirx.noalias", True)
    return mod


def lower(mod, target):
    """The graph rewrites, legalization and fusion before scheduling: the PrimFuncs it leaves
    are what the rules schedule and what `compile --tune` tunes (deploy/tune.py)."""
    import tvm
    from tvm import relax

    from edge.kernels import attention, graph, packing

    mod = attention.replace_attention_kernels(mod)
    with target:
        mod = packing.rewrite_packed_dense(mod, tile_rows(target), var_rows={"num_seqs": decode_tile_rows(target)},
                                           int8=int8_matmuls(mod, target), lanes=vector_lanes(target))
        mod = packing.rewrite_packed_gather(mod)
        mod = graph.expand_small_powers(mod)
        mod = graph.expand_silu(mod)
        mod = graph.rewrite_softmax(mod, vector_lanes(target))
        # erf/exp/tanh legalized as vectorizable polynomials (GELU, SiLU, softmax) instead of libm
        # calls; called directly because inside a Sequential its opt_level (4) would skip it
        mod = relax.transform.FastMathTransform()(mod)
        return tvm.transform.Sequential(
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
