"""Softmax over the last axis (attention rows), static or symbolic row length.

The legalized softmax, scheduled for a row length only known at run time, needs a predicate in
every vector chunk and ends up scalar (~8x slower than the static-length variant); with static
rows dlight's rule still reduces with scalar loops (2.5-3x slower than this). Here the row
is read in chunks of `lanes` with the column index clamped to the row (`min(c, n - 1)`): re-reading
the last element does not change a max, and the sum masks it out with a select, so the chunk loops
carry no predicate and the partial max/sum are vectors (rfactor over the lane).
"""

from __future__ import annotations

MAX = "edgejit_softmax_max"
SUM = "edgejit_softmax_sum"
OUT = "edgejit_softmax_out"


def applies(x, axis: int) -> bool:
    ndim = len(x.shape)
    return axis in (-1, ndim - 1) and str(x.dtype) == "float32"


def compute(x, lanes: int):
    from tvm import te, tirx, topi

    *rows, n = x.shape
    idx_t = str(n.ty.dtype)
    lanes_c = tirx.const(lanes, idx_t)
    chunks = (n + lanes_c - tirx.const(1, idx_t)) // lanes_c
    last = n - tirx.const(1, idx_t)

    def col(ko, ki):
        return tirx.min(ko * lanes_c + ki, last)

    ko = te.reduce_axis((tirx.const(0, idx_t), chunks), name="ko")
    ki = te.reduce_axis((tirx.const(0, idx_t), lanes_c), name="ki")
    mx = te.compute(rows, lambda *r: te.max(x[(*r, col(ko, ki))], axis=[ko, ki]), name=MAX)
    delta = te.compute(x.shape, lambda *i: x[i] - mx[i[:-1]], name="edgejit_softmax_delta")
    ex = topi.fast_exp(delta)
    ko2 = te.reduce_axis((tirx.const(0, idx_t), chunks), name="ko")
    ki2 = te.reduce_axis((tirx.const(0, idx_t), lanes_c), name="ki")
    zero = tirx.const(0.0, "float32")
    sm = te.compute(
        rows,
        lambda *r: te.sum(tirx.Select(ko2 * lanes_c + ki2 < n, ex[(*r, col(ko2, ki2))], zero), axis=[ko2, ki2]),
        name=SUM,
    )
    return te.compute(x.shape, lambda *i: ex[i] / sm[i[:-1]], name=OUT)


def schedule(sch, lanes: int) -> None:
    """Schedule a function holding the softmax blocks (and elementwise consumers after them)."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    mx, sm = blocks[names.index(MAX)], blocks[names.index(SUM)]
    for b, name in zip(blocks[:-1], names[:-1]):
        if name not in (MAX, SUM):
            sch.compute_inline(b)  # delta, exp, the softmax itself, epilogue producers
    partials = []
    for red in (mx, sm):  # per-lane partial max/sum over the chunks, then across the lanes
        *_, ko, ki = sch.get_loops(red)
        partials.append(sch.rfactor(ki, factor_axis=0))
    last = sch.get_child_blocks(root)[-1]
    *rows, col = sch.get_loops(last)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.parallel(row)
    if hasattr(sch.get(col).extent, "value") and int(sch.get(col).extent) % lanes == 0:
        _, lane = sch.split(col, factors=[None, lanes])
        sch.vectorize(lane)  # a symbolic column loop is left to LLVM's vectorizer
    for b in (sm, partials[1], mx, partials[0]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    vectorize_partials(sch, partials, lanes)


def vectorize_partials(sch, partials, lanes: int) -> None:
    """Lane-partial reduction blocks (rfactor over the lane), each computed at a row loop: the
    chunk loop outside, the `lanes` partials vectorized inside."""
    for rf in partials:
        loops = sch.get_loops(rf)[1:]  # under the row loop: the lane loop, unit loops, the chunks
        rko = loops[-1]
        rki = next(lp for lp in loops[:-1] if int(sch.get(lp).extent) == lanes)
        sch.reorder(rko, rki)
        sch.vectorize(rki)
        sch.decompose_reduction(rf, rko)
