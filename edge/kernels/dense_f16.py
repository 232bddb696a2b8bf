"""Dense on fp16 weights (a GGUF F16 file's) for a decode step's few static rows, written by hand.

A decode step streams every weight once, so the product runs at the speed the weights arrive. The
scheduled kernel (edge/kernels/dense.py: fp16 widened in the K loop, the next panel prefetched)
streamed 576 x 3072 fp16 at 32.6 GB/s on one Zen 5 core, weights out of cache, where the
int8-activation kernel streams its codes at 43.5 GB/s. This one reads the weights the way that one
does: one 16-column panel per task, the panel 3 ahead prefetched line by line as the K loop runs
(a line is 2 k of 16 fp16), fp16 widened as loaded (`vcvtph2ps`), 4 independent sums per row so
the FMA latency does not bound it. Rows: a static 1-4 (the artifact's batch-1 step and the JIT's
decode variants, their LM head) where their sums fit in half the vector registers (AVX-512: up to 4
rows; AVX2's 16 ymm and NEON's 4-lane registers: 1 row; 3 rows on AVX2 spilled and ran 20-30%
slower than the scheduled kernel); prefill chunks, the generic module's symbolic rows and more rows
keep the scheduled kernel, whose register tiles suit many rows.
"""

# (no `from __future__ import annotations`: TVMScript reads the kernel's parameter annotations)
from edge.kernels.packing import PANEL
from edge.kernels.tir_exprs import prefetch, tree

MAX_ROWS = 4
CHAINS = 4  # independent partial sums per row (K must be a multiple)
AHEAD = 3  # panels


def applies(lead, k_dim: int, lanes: int) -> bool:
    """Whether x [*lead, k_dim] (static lead dims) fits this kernel on a target of `lanes` fp32
    vector lanes: at most MAX_ROWS rows, their sums in at most half the vector registers (32 of
    them with AVX-512 and NEON, 16 with AVX2)."""
    rows = 1
    for d in lead:
        if not isinstance(d, int):
            return False
        rows *= d
    registers = 16 if lanes == 8 else 32
    return 0 < rows <= MAX_ROWS and rows * CHAINS * (PANEL // lanes) <= registers // 2 and k_dim % CHAINS == 0


def primfunc(lead, n_out: int, k_dim: int):
    """x [*lead, k_dim] (fp32) times packed fp16 weights [n_out / 16, k_dim, 16] -> y [*lead, n_out]."""
    from tvm.script import tirx as T

    R = 1
    for d in lead:
        R *= int(d)
    K, N = int(k_dim), int(n_out)
    P = N // PANEL

    @T.prim_func(private=True)
    def dense_f16(var_x: T.handle, wp: T.Buffer((P, K, PANEL), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(var_x, [*lead, K], "float32")
        y = T.match_buffer(var_y, [*lead, N], "float32")
        xf = T.decl_buffer((R * K,), "float32", data=x.data)
        yf = T.decl_buffer((R * N,), "float32", data=y.data)
        for t in T.parallel(P):
            acc = T.alloc_buffer((R, CHAINS, PANEL), "float32")
            nxt: T.let[T.int32] = T.min(t + AHEAD, P - 1)
            for r in T.unroll(R):
                for c in T.unroll(CHAINS):
                    acc[r, c, 0:PANEL] = T.broadcast(T.float32(0), PANEL)
            for kb in range(K // CHAINS):
                for c in T.unroll(CHAINS):
                    if c % 2 == 0:
                        T.evaluate(prefetch(wp[nxt, kb * CHAINS + c, 0]))
                    w: T.let[T.float32x16] = T.Cast("float32x16", wp.vload([t, kb * CHAINS + c, 0], "float16x16"))
                    for r in T.unroll(R):
                        acc[r, c, 0:PANEL] = acc.vload([r, c, 0], "float32x16") + T.broadcast(
                            xf[r * K + kb * CHAINS + c], PANEL) * w
            for r in T.unroll(R):
                yf[r * N + t * PANEL:r * N + t * PANEL + PANEL] = tree(
                    lambda a, b: a + b, [acc.vload([r, c, 0], "float32x16") for c in range(CHAINS)])

    return dense_f16
