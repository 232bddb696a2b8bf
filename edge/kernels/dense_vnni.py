"""Decode dense on 4-/8-bit weights with int8 activations (x86 AVX-512 VNNI): llama.cpp's Q4 x Q8.

A decode step multiplies a few rows by every weight once, and with fp32 activations the 4-bit
kernel's own arithmetic per weight (unpack, convert, scale, FMA) is the limit, not memory: 576 x
3072 one row, one Zen 5 core, 39 us with the weights in cache. Here the rows are quantized to int8
per weight group (scale = max|x| / 127, as llama.cpp's Q8_1), and `vpdpbusd` multiplies 64 weight
bytes by 4 activation bytes per instruction, adding into 16 int32 column sums; each group's sums
are scaled once: y += sum_q * (scale * xscale) + zero * xscale * sum(xq). The zero term takes the
quantized activations' sum, not the exact one: with a zero near -8 * scale (Q4_1) the two terms
are large and cancel, and only the same activations in both keep the error that of the weight
(SmolLM2 Q4_1, logits against fp32 activations: median error 4.6-6.6% with the exact sum).

The weights keep their packed layout (`edge.kernels.dense`: [N / 16, K(/2), 16], 16 columns per
k): a byte shuffle turns each 64-byte load (4 rows of 16 columns) into 16 lanes of 4 bytes, one
column each (`vpermb` where the target has AVX512-VBMI, else dword permutes and `vpshufb`). For
4-bit codes the low nibbles then hold k = 0, 2, 4, 6 of 8 and the high ones 1, 3, 5, 7, so the
activations are packed in that order. 8-bit codes are signed: they are offset to unsigned
(code + 128: `vpdpbusd` takes unsigned x signed) and 128 * sum(xq) is taken off each group's sums.
Symmetric 8-bit layers (Q8_0) come without a zero tensor: one stream fewer to read.

For every matrix product on 4/8-bit weights of a module compiled for int8 activations, on a target
with AVX-512 VNNI: decode steps (a static 1-8 rows in the JIT's batch variants and the artifact's
batch-1 step, symbolic in the generic module), the LM head, and prefill chunks (their tokens,
symbolic, 4 rows at a time: with the panel's codes in L1 across the chunks, a GEMM; SmolLM2 Q4_1, a
256-token prompt, one Zen 5 core: 619 -> 1,587 tok/s against the fp32-activation kernel). Other
targets use the fp32-activation kernel.
"""

# (no `from __future__ import annotations`: TVMScript reads the kernel's parameter annotations)
from edge.kernels.packing import PANEL
from edge.kernels.target import _attrs

MAX_ROWS = 8  # a static row count up to this is one chunk (registers: 3 zmm per row)
CHUNK = 4  # rows per chunk otherwise (SmolLM2 Q4_1, a 256-token prefill, one core: 4 rows 1,587 tok/s, 8 rows 1,161)
# One panel per tile, prefetched 3 tiles ahead, 2 int32 accumulators per row: 576 x 3072 4-bit one
# row, streamed, one Zen 5 core: 36-39 us (2 panels per tile 39-47, 4 panels 42; no prefetch 46).
TILE_PANELS, AHEAD, CHAINS = 1, 3, 2
_VNNI_CPUS = {"cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake", "sapphirerapids",
              "emeraldrapids", "graniterapids", "znver4", "znver5"}


def supported(target) -> bool:
    """Whether `target` has AVX-512 VNNI (Cascade Lake and later, Zen 4 and later)."""
    triple, mcpu, mattr = _attrs(target)
    if triple and not triple.startswith("x86_64"):
        return False
    return mcpu in _VNNI_CPUS or "+avx512vnni" in mattr


def applies(k_dim: int, groups: int, bits: int) -> bool:
    """Whether weights of `bits` in `groups` groups along k_dim fit this kernel."""
    if bits not in (4, 8):
        return False
    group = k_dim // groups
    return groups * group == k_dim and group % (8 if bits == 4 else 4) == 0


def _tree(vals):
    while len(vals) > 1:
        vals = [a + b for a, b in zip(vals[::2], vals[1::2])] + (vals[-1:] if len(vals) % 2 else [])
    return vals[0]


def _codes(T, load, bits: int, half):
    """64 code bytes (4 k x 16 columns) as `vpdpbusd`'s unsigned operand, one column per 32-bit
    lane: 4-bit, the low (half 0) or high nibbles; 8-bit, offset by 128."""
    # byte 4j + r of the result = byte 16r + j of the load (LLVM picks the instructions: vpermb with
    # AVX512-VBMI, a dword permute and an in-lane byte shuffle without)
    perm = T.Shuffle([load], [16 * (i % 4) + i // 4 for i in range(64)])
    if bits == 8:
        return T.reinterpret("int8x64", perm ^ T.broadcast(T.uint8(128), 64))
    nib = T.if_then_else(half == 0, perm & T.broadcast(T.uint8(15), 64), T.shift_right(perm, T.broadcast(T.uint8(4), 64)))
    return T.reinterpret("int8x64", nib)


def _shape(lead, var, last: int):
    return [d if isinstance(d, int) else var for d in lead] + [last]


def _zero_term(T, zero, has_zero: bool, panel, g, xsum):
    """zero * xscale * sum(xq) of a group, or nothing for symmetric codes."""
    if not has_zero:
        return T.broadcast(T.float32(0), PANEL)
    return zero.vload([panel, g, 0], "float32x16") * T.broadcast(xsum, PANEL)


def _prefetch(T, load):
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(load), 0, 3, 1))


def primfunc(x_shape, n_out: int, k_dim: int, groups: int, bits: int, *, chunk: int | None = None, zero: bool = True):
    """The kernel for x [*x_shape] (last dim k_dim) times packed codes of `bits` with fp32
    scale/zero [N / 16, groups, 16] (`zero` False: symmetric codes, no zero tensor); writes
    y [*x_shape[:-1], n_out].

    The leading dims may hold one symbolic variable (a decoder's `num_seqs`): the rows are then
    taken `chunk` at a time (also a static count of more than MAX_ROWS), a chunk past the last row
    re-reading (and re-writing) that row. A row's arithmetic does not depend on the chunk or on the
    other rows (each row is quantized on its own), so a sequence gets the same logits in the
    generic module and in every batch variant."""
    from tvm import tirx
    from tvm.script import tirx as T

    lead = [int(d) if isinstance(d, (int, tirx.IntImm)) else d for d in x_shape[:-1]]
    sym = [d for d in lead if not isinstance(d, int)]
    if len(sym) > 1:
        raise ValueError("dense_vnni: at most one symbolic row dim")
    static_rows = 1
    for d in lead:
        static_rows *= d if isinstance(d, int) else 1
    symbolic = bool(sym)
    R = static_rows if not symbolic and static_rows <= MAX_ROWS else int(chunk or CHUNK)  # rows per chunk
    K, N, G = int(k_dim), int(n_out), int(groups)
    group = K // G
    P = N // PANEL
    KB = K // 2 if bits == 4 else K  # code rows per panel
    loads = group // 8 if bits == 4 else group // 4  # 64-byte loads per group and panel
    per = 2 if bits == 4 else 1  # vpdpbusd per load (4-bit: low and high nibbles)
    words = loads * per  # int32 activation words per group
    PT, ahead, NCH = TILE_PANELS, AHEAD, CHAINS
    tiles = P // PT
    code_t = "uint8" if bits == 4 else "int8"
    has_zero = zero

    @T.macro
    def kernel(xf, yf, wf, scale, zero, rows):
        xq = T.alloc_buffer((rows, G * words), "int32")
        xs = T.alloc_buffer((rows, G), "float32")
        xsum = T.alloc_buffer((rows, G), "float32")
        xqsum = T.alloc_buffer((rows, G), "int32")
        for m, g in T.grid(rows, G):
            amax = T.alloc_buffer((1,), "float32")
            amax[0] = T.float32(0)
            for k in range(group):
                amax[0] = T.max(amax[0], T.fabs(xf[m * K + g * group + k]))
            inv: T.let[T.float32] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            xs[m, g] = amax[0] / T.float32(127)
            qs = T.alloc_buffer((1,), "int32")
            qs[0] = 0
            for w in range(words):
                word = T.alloc_buffer((1,), "int32")
                word[0] = 0
                for b in range(4):
                    # 4-bit: word 2i + h holds k = 8i + h + {0, 2, 4, 6}; 8-bit: word i holds k = 4i + b
                    kk: T.let[T.int32] = (w // 2) * 8 + w % 2 + b * 2 if bits == 4 else w * 4 + b
                    q: T.let[T.int32] = T.Cast("int32", T.round(xf[m * K + g * group + kk] * inv))
                    word[0] = word[0] | T.shift_left(q & 255, b * 8)
                    qs[0] = qs[0] + q
                xq[m, g * words + w] = word[0]
            xqsum[m, g] = qs[0]
            xsum[m, g] = T.Cast("float32", qs[0]) * xs[m, g]
        for t in T.parallel(tiles):
            acc = T.alloc_buffer((R, PT, PANEL), "float32")
            ia = T.alloc_buffer((R, PT, NCH, PANEL), "int32")
            for c in range((rows + R - 1) // R):
                for r in T.unroll(R):
                    for p in T.unroll(PT):
                        acc[r, p, 0:PANEL] = T.broadcast(T.float32(0), PANEL)
                for g in range(G):
                    for p in T.unroll(PT):
                        nxt: T.let[T.int32] = T.min(t + ahead, tiles - 1) * PT + p
                        for ln in T.unroll(loads):
                            _prefetch(T, wf[(nxt * KB + g * (KB // G) + ln * 4) * PANEL])
                        _prefetch(T, scale[nxt, g, 0])
                        if has_zero:
                            _prefetch(T, zero[nxt, g, 0])
                    for r in T.unroll(R):
                        for p in T.unroll(PT):
                            for h in T.unroll(NCH):
                                ia[r, p, h, 0:PANEL] = T.broadcast(T.int32(0), PANEL)
                    for i in T.unroll(loads):
                        for p in T.unroll(PT):
                            for h in T.unroll(per):
                                for r in T.unroll(R):
                                    ia[r, p, (i * per + h) % NCH, 0:PANEL] = T.call_llvm_pure_intrin(
                                        "int32x16", "llvm.x86.avx512.vpdpbusd.512", ia.vload([r, p, (i * per + h) % NCH, 0], "int32x16"),
                                        _codes(T, wf[T.ramp(((t * PT + p) * KB + g * (KB // G) + i * 4) * PANEL, 1, 64)], bits, h),
                                        T.reinterpret("int8x64", T.broadcast(xq[T.min(c * R + r, rows - 1), g * words + i * per + h], PANEL)))
                    for r in T.unroll(R):
                        for p in T.unroll(PT):
                            acc[r, p, 0:PANEL] = acc.vload([r, p, 0], "float32x16") + T.Cast("float32x16", _tree(
                                [ia.vload([r, p, j, 0], "int32x16") for j in range(NCH)]) - T.broadcast(
                                    xqsum[T.min(c * R + r, rows - 1), g] * (128 if bits == 8 else 0), PANEL)) * (
                                scale.vload([t * PT + p, g, 0], "float32x16") * T.broadcast(xs[T.min(c * R + r, rows - 1), g], PANEL)
                            ) + _zero_term(T, zero, has_zero, t * PT + p, g, xsum[T.min(c * R + r, rows - 1), g])
                for r in T.unroll(R):
                    for p in T.unroll(PT):
                        yf[T.min(c * R + r, rows - 1) * N + (t * PT + p) * PANEL:T.min(c * R + r, rows - 1) * N + (t * PT + p) * PANEL + PANEL] = acc.vload([r, p, 0], "float32x16")

    @T.macro
    def entry(var_x, wq, scale, zero, var_y):
        """The buffers over the caller's tensors (rows flattened), then the kernel."""
        n = T.int64()
        x = T.match_buffer(var_x, _shape(lead, n, K), "float32")
        y = T.match_buffer(var_y, _shape(lead, n, N), "float32")
        rows: T.let[T.int64] = n * static_rows if symbolic else T.int64(static_rows)
        xf = T.decl_buffer((rows * K,), "float32", data=x.data)
        yf = T.decl_buffer((rows * N,), "float32", data=y.data)
        wf = T.decl_buffer((P * KB * PANEL,), code_t, data=wq.data)
        kernel(xf, yf, wf, scale, zero, rows)

    if has_zero:
        @T.prim_func(private=True)
        def dense_vnni(var_x: T.handle, wq: T.Buffer((P, KB, PANEL), code_t), scale: T.Buffer((P, G, PANEL), "float32"),
                       zero: T.Buffer((P, G, PANEL), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            entry(var_x, wq, scale, zero, var_y)
    else:  # symmetric codes: no zero tensor
        @T.prim_func(private=True)
        def dense_vnni(var_x: T.handle, wq: T.Buffer((P, KB, PANEL), code_t), scale: T.Buffer((P, G, PANEL), "float32"),
                       var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            entry(var_x, wq, scale, scale, var_y)

    return dense_vnni
