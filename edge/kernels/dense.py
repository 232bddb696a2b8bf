"""Dense layer against a pre-packed weight: y[..., j] = sum_k x[..., k] * Wp[j // n, k, j % n].

The weight is packed on the host into `[N / n, K, n]` panels (see `pack_weight`), so the inner
loop reads `n` contiguous floats for every k. The product is computed into row tiles (`compute`):
an `rows x n` output tile stays in registers (the `n` columns vectorized, the rows unrolled), the
reduction over K runs outside the tile, and the column panels are spread over the thread pool.
Rows are the (possibly symbolic) batch x sequence positions; the last tile re-reads the last row
instead of carrying a predicate. One pass then lays the tiles out as [..., N] with the fused
elementwise epilogue applied.
"""

from __future__ import annotations

import numpy as np

from edge.kernels import tir_exprs

BLOCK_NAME = "edgejit_dense_packed"


def pack_weight(w: np.ndarray, n: int) -> np.ndarray:
    """[K, N] -> [N / n, K, n] (N must be a multiple of n)."""
    k, cols = w.shape
    return np.ascontiguousarray(w.reshape(k, cols // n, n).transpose(1, 0, 2))


def compute(x, wp, rows: int):
    """TE compute for the packed dense; `x` is [..., K], `wp` is [N / n, K, n].

    The product is computed into row tiles `tile[M / rows, N / n, rows, n]` (rows past the end
    read the last row again), then laid out as [..., N]: the tile stays a fixed-size register
    block even when M is symbolic, and the tail needs no predicate inside the K loop.
    """
    panels, k_dim, n = wp.shape
    return _tiled(x, panels, k_dim, n, rows, lambda jo, k, ji: as_f32(wp[jo, k, ji]))


def as_f32(value):
    """A weight element (or a quantized weight's scale or zero) as fp32: fp16 ones (a GGUF F16
    file's weights, every group's scale and zero) are widened where they are read."""
    return value if str(value.dtype) == "float32" else value.astype("float32")


def widen(w):
    """fp16 packed weight -> fp32. Models write their fp16 matmuls as matmul(x, unpack(widen(W)));
    the build reads W in the dense kernel instead (edge.kernels.packing), so this only runs if
    that rewrite does not apply."""
    from tvm import te

    return te.compute(w.shape, lambda *i: w[i].astype("float32"), name="edgejit_widen")


def compute_quant(x, wq, scale, zero, rows: int):
    """The packed dense on weight-only quantized weights, dequantized in the inner loop:
    w[k, j] = q * scale + zero, per group of `K / groups` consecutive k. int8 `wq` [N / n, K, n]
    holds 8-bit codes; uint8 `wq` [N / n, K / 2, n] 4-bit ones, element 2i in the low nibble of
    byte i and 2i + 1 in the high one. `scale`, `zero`: fp16 (or fp32) [N / n, groups, n], widened
    where they are read (`zero` None: symmetric codes, w = q * scale)."""
    panels, kq, n = wq.shape
    k_dim = kq * 2 if _bits(wq) == 4 else kq
    return _tiled(x, panels, k_dim, n, rows, _quant_weight(wq, scale, zero))


def compute_quant_sym(x, wq, scale, rows: int):
    """compute_quant of symmetric 8-bit codes (no zero tensor)."""
    return compute_quant(x, wq, scale, None, rows)


def dequant_sym(wq, scale):
    """dequant of symmetric 8-bit codes (no zero tensor): the model's Q8S layers."""
    return dequant(wq, scale, None)


def dequant(wq, scale, zero):
    """The packed float weight [N / n, K, n] from quantized codes (the layouts of compute_quant).
    Models write their quantized matmuls as matmul(x, unpack(dequant(...))); the build turns that
    into compute_quant (edge.kernels.packing), so this only runs if that rewrite does not apply."""
    from tvm import te

    weight = _quant_weight(wq, scale, zero)
    panels, kq, n = wq.shape
    k_dim = kq * 2 if _bits(wq) == 4 else kq
    return te.compute((panels, k_dim, n), weight, name="edgejit_dequant")


def _bits(wq) -> int:
    return 4 if str(wq.dtype) == "uint8" else 8


def _quant_weight(wq, scale, zero):
    from tvm import tirx

    bits = _bits(wq)
    k_dim = wq.shape[1] * 2 if bits == 4 else wq.shape[1]
    group = k_dim // scale.shape[1]

    def weight(jo, k, ji):
        if bits == 4:
            q = (wq[jo, k // 2, ji] >> ((k % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
        else:
            q = wq[jo, k, ji]
        w = q.astype("float32") * as_f32(scale[jo, k // group, ji])
        return w if zero is None else w + as_f32(zero[jo, k // group, ji])

    return weight


def _tiled(x, panels, k_dim, n, rows: int, weight):
    from tvm import te, tirx

    lead = list(x.shape[:-1])
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    idx_t = str(m.ty.dtype)
    rows_c = tirx.const(rows, idx_t)
    k_dim = k_dim if hasattr(k_dim, "ty") else tirx.const(int(k_dim), "int64")
    k = te.reduce_axis((tirx.const(0, str(k_dim.ty.dtype)), k_dim), name="k")

    def unflatten(r):
        out = []
        for d in reversed(lead):
            out.append(r % d)
            r = r // d
        return tuple(reversed(out))

    def tile_body(q, jo, mi, ji):
        r = tirx.min(q * rows_c + mi, m - tirx.const(1, idx_t))
        return te.sum(x[(*unflatten(r), k)] * weight(jo, k, ji), axis=k)

    tile = te.compute(
        [(m + rows_c - tirx.const(1, idx_t)) // rows_c, panels, rows_c, n], tile_body, name=BLOCK_NAME
    )

    def out_body(*idx):
        r = idx[0]
        for i, d in zip(idx[1:-1], lead[1:]):
            r = r * d + i
        j = idx[-1]
        return tile[r // rows_c, j // n, r % rows_c, j % n]

    return te.compute([*lead, panels * n], out_body, name=BLOCK_NAME + "_out")


def schedule(sch, block, *, lanes: int, panels: int = 1) -> tuple[int, int]:
    """Schedule the dense tile block and everything after it (its layout block and the fused
    elementwise epilogue: bias, activation, residual) in place. The register tile is
    `rows x (panels * n)`: with 2 panels every broadcast row value feeds two FMAs.

    A tile of few rows (a decode step) has too few accumulators to hide the FMA latency: one row x
    2 panels is 2 dependency chains as long as K. The K loop is then split into interleaved partial
    sums (rfactor) up to `KREGS` vector accumulators, added up once at the end. 576 x 3072 4-bit,
    one Zen 5 core: 1 row 49 -> 38 us, 2 rows 54 -> 46 us. Returns (panels, K split) as scheduled."""
    after = _blocks_after(sch, block)
    for b in after[:-1]:
        try:
            sch.compute_inline(b)
        except Exception:  # e.g. shapes FuseTIR left in a form the inliner can't match: own loop
            _schedule_elementwise(sch, b, lanes)
    q, jo, mi, ji, k = sch.get_loops(block)
    panels = panels if panels > 1 and int(sch.get(jo).extent) % panels == 0 else 1
    rows, n = int(sch.get(mi).extent), int(sch.get(ji).extent)
    # Only with a static number of tiles: with a symbolic one the partial sums' buffer stays
    # full-size in memory (not compacted to the tile) and the kernel ran ~50x slower.
    static = hasattr(sch.get(q).extent, "value")
    split = _k_split(rows * panels * max(1, n // lanes), sch.get(k).extent) if static else 1
    if split > 1:
        ko, kl = sch.split(k, factors=[None, split])
        final, block = block, sch.rfactor(kl, factor_axis=0)
        q, jo, mi, ji, k, kl = sch.get_loops(block)
    if panels > 1:
        jo, jp = sch.split(jo, factors=[None, panels])
        sch.reorder(jo, q, k, *([kl] if split > 1 else []), mi, jp, ji)
        sch.unroll(jp)
    else:
        sch.reorder(jo, q, k, *([kl] if split > 1 else []), mi, ji)
    if split > 1:
        sch.unroll(kl)
        sch.reverse_compute_at(final, q)  # the partial sums added up per tile, still in registers
        loops = sch.get_loops(final)
        inner = loops[[sch.get(lp).same_as(sch.get(q)) for lp in loops].index(True) + 1:]
        fji = next(lp for lp in inner if int(sch.get(lp).extent) == int(sch.get(ji).extent))
        fkl = next(lp for lp in inner if int(sch.get(lp).extent) == split)
        sch.reorder(fkl, fji)
        sch.vectorize(fji)
    sch.unroll(mi)
    sch.vectorize(ji)
    sch.parallel(jo)
    _schedule_elementwise(sch, after[-1], lanes)
    sch.decompose_reduction(block, k)
    return panels, split


def add_prefetch(func, *, panels: int, split: int):
    """The quantized or fp16 dense `func` (as `schedule` left it, with its K loop split: a tile of
    1-2 rows) with software prefetches of the next panels' codes, scales and zeros (fp16: weights)
    in its K loop, one per cache line.

    A decode step streams every weight from memory once; the panels are contiguous, but the
    hardware prefetchers did not keep up with three streams per panel (codes, scales, zeros) at
    this compute per byte: reading them a panel ahead overlaps the misses with the current panel's
    arithmetic. 576 x 3072 4-bit, weights not in cache, one Zen 5 core: 1 row 99-112 -> 43-48 us,
    2 rows 117 -> 56 us (in cache: unchanged). fp16, 1 row, cold: 576 x 3072 107 -> 102 us,
    1536 x 576 55 -> 50 us, the 576 x 49152 LM head 2.45 -> 1.95 ms. Tiles of 4+ rows are left alone: with the K loop
    unsplit, the calls kept LLVM from holding the accumulators in registers (2.3x slower)."""
    from tvm import s_tir, tirx

    kind = str(func.params[1].dtype) if len(func.params) >= 3 else ""
    if kind in ("uint8", "int8") and len(func.params) >= 4:
        wq, scale, zero = func.params[1:4]
        if [str(d) for d in zero.shape] != [str(d) for d in scale.shape]:  # symmetric codes: no zero tensor
            zero = None
        bits = 4 if kind == "uint8" else 8
        k_dim = int(wq.shape[1]) * (2 if bits == 4 else 1)
        group = k_dim // int(scale.shape[1])
    elif kind == "float16":  # fp16 weights: one stream, no scales
        wq, scale, zero, bits = func.params[1], None, None, 16
        k_dim = group = int(wq.shape[1])
    else:
        return func
    n_panels = int(wq.shape[0])
    k_per_line = {4: 8, 8: 4, 16: 2}[bits]  # rows of 16 columns per 64-byte line

    def prefetch(buf, *idx):
        return tirx.Evaluate(tir_exprs.prefetch(buf[tuple(idx)]))

    def prefetches(jo, ko):
        it = str(ko.ty.dtype)
        c = lambda v: tirx.const(v, it)  # noqa: E731
        k = ko * c(split)
        row = k // c(2) if bits == 4 else k
        nxt = [tirx.min((jo + c(1)) * c(panels) + c(p), c(n_panels - 1)) for p in range(panels)]
        codes = tirx.IfThenElse(tirx.floormod(k, c(k_per_line)) < c(split), seq([prefetch(wq, n, row, c(0)) for n in nxt]), None)
        if scale is None:
            return codes
        groups = seq([prefetch(b, n, k // c(group), c(0)) for n in nxt for b in (scale, zero) if b is not None])
        return tirx.SeqStmt([codes, tirx.IfThenElse(tirx.floormod(k, c(group)) < c(split), groups, None)])

    def seq(stmts):  # TVM refuses a SeqStmt of one statement (symmetric codes, one panel per tile: one prefetch)
        return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)

    def rewrite(stmt, jo):
        if isinstance(stmt, tirx.For):
            if jo is None and stmt.kind == tirx.ForKind.PARALLEL:
                jo = stmt.loop_var
            elif jo is not None and stmt.loop_var.name in ("k", "k_0") and stmt.kind == tirx.ForKind.SERIAL:
                body = tirx.SeqStmt([prefetches(jo, stmt.loop_var), stmt.body])
                return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, rewrite(stmt.body, jo), stmt.thread_binding,
                            stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([rewrite(x, jo) for x in stmt.seq])
        if isinstance(stmt, s_tir.stmt.SBlockRealize) and stmt.block.name_hint == "root":
            b = stmt.block
            block = s_tir.stmt.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, rewrite(b.body, jo), b.init,
                                      b.alloc_buffers, b.match_buffers, b.annotations)
            return s_tir.stmt.SBlockRealize(stmt.iter_values, stmt.predicate, block)
        return stmt

    return func.with_body(rewrite(func.body, None))


KREGS = 8  # vector accumulators a tile needs to keep the FMA units busy (measured on Zen 5)


def _k_split(registers: int, k_extent) -> int:
    if registers >= KREGS or not hasattr(k_extent, "value"):
        return 1
    split = KREGS // registers
    return split if int(k_extent) % split == 0 else 1


def _schedule_elementwise(sch, block, lanes: int) -> None:
    *lead, j = sch.get_loops(block)
    outer = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    _, ji = sch.split(j, factors=[None, lanes])
    sch.vectorize(ji)
    sch.parallel(outer)


def _blocks_after(sch, block):
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1:]
