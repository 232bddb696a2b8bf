"""Apply the schedule rules to every PrimFunc of a legalized, fused module."""

from __future__ import annotations

import math
import os

from edge.kernels import dense, softmax
from edge.kernels.target import tile_panels, vector_lanes

_DEBUG = bool(os.environ.get("EDGEJIT_KERNELS_DEBUG"))
_SCHEDULED = ("tirx.is_scheduled", "tir.is_scheduled")
# Elementwise functions of at most this many elements (a decode step's residual adds, RoPE, SwiGLU
# gate: 576-12,288) run on the calling thread: waking the pool for a few microseconds of work cost
# more than it saved (SmolLM2 Q4_1 decode at 2 threads: ~150 such launches per token).
SERIAL_ELEMENTS = 16384


def is_scheduled(func) -> bool:
    return any(k in func.attrs and bool(func.attrs[k]) for k in _SCHEDULED) if func.attrs else False


def schedule_module(mod, target):
    from tvm import tirx

    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        sch = schedule_func(func, target, gv.name_hint)
        if sch is not None:
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def schedule_func(func, target, name: str = "?"):
    """A scheduled copy of `func`, or None when no rule applies (it is then compiled as is)."""
    from tvm import s_tir

    for rule in (_dense_rule, _softmax_rule, _matmul_rule, _lane_rule, _row_rule, _reduction_rule, _elementwise_rule):
        sch = s_tir.Schedule(func)
        try:
            if rule(sch, target):
                return rule.result if rule in (_reduction_rule, _dense_rule) else sch
        except Exception as e:  # a rule that does not fit this function: try the next one
            if _DEBUG:
                print(f"edgejit kernels: {rule.__name__} failed on {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
    return None


def _dense_rule(sch, target) -> bool:
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == dense.BLOCK_NAME]
    if len(blocks) != 1:
        return False
    from tvm import s_tir

    panels, split = dense.schedule(sch, blocks[0], lanes=vector_lanes(target), panels=tile_panels(target))
    func = sch.mod["main"]
    _dense_rule.result = s_tir.Schedule(dense.add_prefetch(func, panels=panels, split=split) if split > 1 else func)
    return True


def _softmax_rule(sch, target) -> bool:
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if softmax.MAX not in names or softmax.SUM not in names:
        return False
    softmax.schedule(sch, vector_lanes(target))
    return True


def _matmul_rule(sch, target) -> bool:
    """Batched matmul of two activations (attention scores and context), plus its epilogue."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(sch)
    if not infos:
        return False
    reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
    if len(reductions) != 1:
        return False
    main = infos[reductions[0]]
    kinds = main.dom_kind()
    if kinds[-1] != "R" or kinds.count("R") != 1 or kinds.count("S") < 2 or len(sch.get(main.block_rv).reads) != 2:
        return False
    before, after = infos[: reductions[0]], infos[reductions[0] + 1 :]
    for b in before:  # transposes of the operands: materialized once, read contiguously in the k loop
        _spatial(sch, b.block_rv, vector_lanes(target))
    for b in after[:-1]:
        sch.compute_inline(b.block_rv)
    block = main.block_rv
    lanes = vector_lanes(target)
    name = sch.get(block).name_hint
    extents = [sch.get(l).extent for l in sch.get_loops(block)]
    # A symbolic column dim (attention scores: keys) is left whole, innermost, to LLVM's
    # vectorizer: padding it to whole vectors cost 2-4x more (pad copies, padded output).
    wide_j = hasattr(extents[-2], "value")
    tile = [1] * (len(extents) - 3) + [4, lanes if wide_j else 1, 1]
    if any(t > 1 and (not hasattr(e, "value") or int(e) % t) for e, t in zip(extents, tile)):
        # Pad the symbolic (sequence) dims to whole tiles: the tile loops then need no
        # predicate and vectorize; the pad/unpad copies are cheap next to the product.
        sch.pad_einsum(block, tile)
        block = sch.get_sblock(name)
        for b in sch.get_producers(block):
            _spatial(sch, b, lanes)
        (unpad,) = sch.get_consumers(block)
        if after:
            sch.compute_inline(unpad)
        else:
            _spatial(sch, unpad, lanes)
    *batch, i, j, k = sch.get_loops(block)
    outer = sch.fuse(*batch) if len(batch) > 1 else (batch[0] if batch else None)
    io, ii = sch.split(i, factors=[None, 4])
    if wide_j:
        jo, ji = sch.split(j, factors=[None, lanes])
        sch.reorder(io, jo, k, ii, ji)
        sch.vectorize(ji)
    else:
        sch.reorder(io, k, ii, j)
    sch.unroll(ii)
    sch.parallel(outer if outer is not None else io)
    if after:
        _spatial(sch, after[-1].block_rv, lanes)
    sch.decompose_reduction(block, k)
    return True


def _lane_rule(sch, target) -> bool:
    """Row reductions over a static last axis (layer norm): each reduction keeps `lanes` partial
    sums over the row's vector chunks (rfactor over the lane) and adds them at the end, rows in
    parallel, everything else inlined or computed per row. dlight's rule reduced with scalar loops
    here; this is the schedule MetaSchedule found for layer norm (2-5x faster)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    lanes = vector_lanes(target)
    infos = normalize_prim_func(sch)
    if not infos or len(infos) < 2 or not infos[-1].is_injective():
        return False
    ndim = len(infos[-1].dom_kind())
    reductions = [b for b in infos if not b.is_injective()]
    # One static row (a decode step of one sequence): normalization dropped the output's unit row
    # loops but keeps the reductions' unit row loop.
    one_row = ndim == 1 and all(len(b.dom_kind()) == 2 for b in reductions)
    if not reductions or any(b.dom_kind().count("R") != 1 or b.dom_kind()[-1] != "R"
                             or len(b.dom_kind()) != (2 if one_row else ndim) for b in reductions):
        return False
    for b in reductions:
        k = sch.get_loops(b.block_rv)[-1]
        if not hasattr(sch.get(k).extent, "value") or int(sch.get(k).extent) % lanes:
            return False
    for b in infos[:-1]:
        if b.is_injective():
            sch.compute_inline(b.block_rv)
    partials = []
    for b in reductions:
        *_, k = sch.get_loops(b.block_rv)
        _, ki = sch.split(k, factors=[None, lanes])
        partials.append(sch.rfactor(ki, factor_axis=0))
    last = infos[-1].block_rv
    *rows, col = sch.get_loops(last)
    if one_row:  # a unit row loop to compute the reductions under
        row, col = sch.split(col, factors=[1, None])
    else:
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        sch.parallel(row)
    if hasattr(sch.get(col).extent, "value") and int(sch.get(col).extent) % lanes == 0:
        _, lane = sch.split(col, factors=[None, lanes])
        sch.vectorize(lane)
    for b, rf in reversed(list(zip(reductions, partials))):
        sch.compute_at(b.block_rv, row, preserve_unit_loops=True)
        sch.compute_at(rf, row, preserve_unit_loops=True)
    softmax.vectorize_partials(sch, partials, lanes)
    return True


def _row_rule(sch, target) -> bool:
    """Row reductions over the last axis (softmax, layer norm) with their elementwise neighbours:
    everything is inlined or computed per row, so no full-size temporaries, vectorized row loops,
    rows spread over the thread pool."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(sch)
    if not infos or len(infos) < 2 or not infos[-1].is_injective():
        return False
    if all(b.is_injective() for b in infos) or any(b.dom_kind().count("R") > 1 for b in infos):
        return False
    ndim = len(infos[-1].dom_kind())
    if any(not b.is_injective() and (b.dom_kind()[-1] != "R" or len(b.dom_kind()) != ndim) for b in infos):
        return False
    for b in infos[:-1]:
        if b.is_injective():
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                pass
    last = infos[-1].block_rv
    *rows, col = sch.get_loops(last)
    if hasattr(sch.get(col).extent, "value"):
        return False  # static rows: dlight's rule (vectorized reductions) does better
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.parallel(row)  # the symbolic row loop is left to LLVM's vectorizer (see _spatial)
    producers = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint != sch.get(last).name_hint]
    for b in reversed(producers):
        sch.compute_at(b, row, preserve_unit_loops=True)
    return True


def _reduction_rule(sch, target) -> bool:
    """Softmax, layer norm and other row reductions: dlight's CPU Reduction rule."""
    from tvm.s_tir.dlight.cpu import Reduction

    result = Reduction().apply(sch.mod["main"], target, False)
    if result is None:
        return False
    _reduction_rule.result = result
    return True


def _elementwise_rule(sch, target) -> bool:
    """Injective functions: inline into the last block, parallel outer loop, vectorized inner."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(sch)
    if not infos or not all(b.is_injective() for b in infos):
        return False
    for b in infos[:-1]:
        try:
            sch.compute_inline(b.block_rv)
        except Exception:
            return False
    _spatial(sch, infos[-1].block_rv, vector_lanes(target))
    return True


def _spatial(sch, block, lanes: int) -> None:
    """Parallel outer loops, vectorized inner loop. A symbolic inner loop is left to LLVM's loop
    vectorizer (it emits the vector body and a scalar tail); splitting it here would put a
    predicate in the body, and TVM then gives up vectorizing it (measured ~3x slower)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    *lead, last = loops
    # TVM 0.27 emits invalid LLVM for vectorized bool logic (an `and` of <16 x i1> with a
    # <16 x i8> load): leave mask blocks scalar, they are tiny.
    stmt = sch.get(block)
    static = hasattr(sch.get(last).extent, "value") and not any(
        str(r.source.dtype) == "bool" for r in (*stmt.reads, *stmt.writes))
    extents = [sch.get(lp).extent for lp in loops]
    small = all(hasattr(e, "value") for e in extents) and math.prod(int(e) for e in extents) <= SERIAL_ELEMENTS
    if not lead:
        if static:
            outer, inner = sch.split(last, factors=[None, lanes])
            sch.vectorize(inner)
            if not small:
                sch.parallel(outer)
        return
    outer = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    if static:
        _, inner = sch.split(last, factors=[None, lanes])
        sch.vectorize(inner)
    if not small:
        sch.parallel(outer)
