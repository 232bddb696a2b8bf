"""Dense on 4-/8-bit weights with int8 activations: llama.cpp's Q4 x Q8, on every ISA with int8 dot products.

A decode step multiplies a few rows by every weight once, and with fp32 activations the 4-bit
kernel's own arithmetic per weight (unpack, convert, scale, FMA) is the limit, not memory: 576 x
3072 one row, one Zen 5 core, 39 us with the weights in cache. Here the rows are quantized to int8
per weight group (scale = max|x| / 127, as llama.cpp's Q8_1), and an integer dot-product
instruction multiplies 4 code bytes by 4 activation bytes per int32 lane; each group's int32 column
sums are scaled once: y += sum_q * (scale * xscale) + zero * xscale * sum(xq). The zero term takes
the quantized activations' sum, not the exact one: with a zero near -8 * scale (Q4_1) the two terms
are large and cancel, and only the same activations in both keep the error that of the weight
(SmolLM2 Q4_1, logits against fp32 activations: median error 4.6-6.6% with the exact sum).

The weights keep their packed layout (`edge.kernels.dense`: [N / 16, K(/2), 16], 16 columns per
k): each 64-byte load (4 code rows of 16 columns) is transposed into 16 int32 lanes of 4 bytes, one
column each. For 4-bit codes the low nibbles then hold k = 0, 2, 4, 6 of 8 and the high ones
1, 3, 5, 7, so the activations are packed in that order. The instruction per ISA (`isa`):
- `vnni512` (AVX-512 VNNI): `vpdpbusd`, 64 code bytes per instruction; the transpose is one byte
  permute (`vpermb` with AVX512-VBMI, else dword permutes and `vpshufb`). It takes unsigned x
  signed, so 8-bit codes are offset (code + 128) and 128 * sum(xq) is taken off each group's sums.
- `avx2`: `vpmaddubsw` (u8 x s8 -> s16 pairs) and `vpmaddwd` by 1s, 32 bytes at a time; 8-bit codes
  go in as |code| x sign(code) * x, so a pair sums to at most 2 * 128 * 127 < 32767 (no saturation);
  4-bit codes are unsigned already, and a load's two nibbles share one `vpmaddwd` (_dot_nibbles).
- `avxvnni` (AVX-VNNI without AVX-512: Alder Lake and later cores, Intel N100, Zen 5): the VEX
  `vpdpbusd`, 32 bytes at a time, with AVX2's treatment of 8-bit codes (no offset).
- `dotprod` (aarch64 +dotprod: Raspberry Pi 5, Jetson Orin): `sdot`, s8 x s8, 16 bytes at a time.
The 256- and 128-bit transposes are two rounds of byte and halfword zips (`punpck*` / `zip1/zip2`).
Symmetric 8-bit layers (Q8_0) come without a zero tensor: one stream fewer to read.

For every matrix product on 4/8-bit weights of a module compiled for int8 activations
(edge.kernels.int8_matmuls): decode steps (a static 1-8 rows in the JIT's batch variants and the
artifact's batch-1 step, symbolic in the generic module), the LM head, and prefill chunks (their
tokens, symbolic, a few rows at a time: with the panel's codes in L1 across the chunks, a GEMM;
SmolLM2 Q4_1, a 256-token prompt, one Zen 5 core, vnni512: 619 -> 1,587 tok/s against the
fp32-activation kernel). Targets without int8 dot products (ARMv8.0 NEON) use the fp32-activation
kernel.
"""

# (no `from __future__ import annotations`: TVMScript reads the kernel's parameter annotations)
import operator

from edge.kernels.packing import PANEL
from edge.kernels.tir_exprs import prefetch, tree

ISAS = ("vnni512", "avxvnni", "avx2", "dotprod")  # edge.kernels.int8.isa_of names that have this kernel
INSTRUCTIONS = {"vnni512": "AVX-512 VNNI vpdpbusd", "avxvnni": "AVX-VNNI vpdpbusd", "avx2": "AVX2 vpmaddubsw", "dotprod": "ARM sdot"}
LANES = {"vnni512": 16, "avxvnni": 8, "avx2": 8, "dotprod": 4}  # int32 lanes per instruction
# Rows per chunk: a static row count up to MAX_ROWS is one chunk, otherwise CHUNK rows at a time.
# vnni512: 3 zmm per row; SmolLM2 Q4_1, a 256-token prefill, one core: 4 rows 1,587 tok/s, 8 rows 1,161.
# avxvnni, avx2, dotprod: 16 columns are 2 ymm / 4 q registers of int32 sums and as many of fp32 per row.
MAX_ROWS = {"vnni512": 8, "avxvnni": 4, "avx2": 4, "dotprod": 4}
CHUNK = 4
# One panel per tile, prefetched 3 tiles ahead; vnni512 keeps 2 chains of int32 sums per row (576 x
# 3072 4-bit one row, streamed, one Zen 5 core: 36-39 us; 2 panels per tile 39-47, 4 panels 42; no
# prefetch 46); the narrower ISAs have 2-4 independent sums per load already.
TILE_PANELS, AHEAD = 1, 3
CHAINS = {"vnni512": 2, "avxvnni": 1, "avx2": 1, "dotprod": 1}


def isa(target) -> str | None:
    """This kernel's instruction set on `target` (one of ISAS), or None: no int8 dot products."""
    from edge.kernels.int8 import isa_of

    name = isa_of(target)
    return name if name in ISAS else None


def applies(k_dim: int, groups: int, bits: int) -> bool:
    """Whether weights of `bits` in `groups` groups along k_dim fit this kernel."""
    if bits not in (4, 8):
        return False
    group = k_dim // groups
    return groups * group == k_dim and group % (8 if bits == 4 else 4) == 0


def _columns(T, wf, base, bits: int, lanes: int, v):
    """The 64 code bytes at wf[base:] (4 code rows x 16 columns) as 16 / lanes vectors of `lanes`
    int32 lanes, 4 bytes each, one column per lane, in the code type: vector `v` (a loop variable
    of an unrolled loop: the choice folds away)."""
    t = "uint8" if bits == 4 else "int8"
    if lanes == 16:
        # byte 4j + r = byte 16r + j of the load (LLVM picks the instructions: vpermb with
        # AVX512-VBMI, a dword permute and an in-lane byte shuffle without)
        return T.Shuffle([wf[T.ramp(base, 1, 64)]], [16 * (i % 4) + i // 4 for i in range(64)])
    rows = [wf[T.ramp(base + 16 * r, 1, 16)] for r in range(4)]

    def zip8(a, b, hi):  # bytes of a and b interleaved: zip1 / zip2 (punpcklbw / punpckhbw)
        return T.Shuffle([a, b], [i // 2 + 16 * (i % 2) + 8 * hi for i in range(16)])

    def zip16(a, b, hi):  # halfwords of a and b interleaved
        w = T.Shuffle([T.reinterpret(t.replace("8", "16") + "x8", a), T.reinterpret(t.replace("8", "16") + "x8", b)],
                      [i // 2 + 8 * (i % 2) + 4 * hi for i in range(8)])
        return T.reinterpret(f"{t}x16", w)

    pairs = [zip8(rows[0], rows[1], h) for h in (0, 1)], [zip8(rows[2], rows[3], h) for h in (0, 1)]
    quads = [zip16(pairs[0][h], pairs[1][h], q) for h in (0, 1) for q in (0, 1)]  # columns 4i..4i+3
    vecs = quads if lanes == 4 else [T.Shuffle([quads[2 * i], quads[2 * i + 1]], list(range(32))) for i in (0, 1)]
    pick = vecs[-1]
    for i in range(len(vecs) - 2, -1, -1):
        pick = T.if_then_else(v == i, vecs[i], pick)
    return pick


def _codes(T, vec, bits: int, half, isa_name: str):
    """One vector of _columns as the dot product's weight operand: 4-bit, the low (half 0) or high
    nibbles; 8-bit on vnni512, offset by 128 (`vpdpbusd` takes unsigned x signed)."""
    n = 4 * LANES[isa_name]
    if bits == 8:
        return T.reinterpret(f"int8x{n}", vec ^ T.broadcast(T.int8(-128), n)) if isa_name == "vnni512" else vec
    return T.reinterpret(f"int8x{n}", T.if_then_else(half == 0, _nibbles(T, vec, n, 0), _nibbles(T, vec, n, 1)))


def _nibbles(T, vec, n: int, half: int):
    """The low (half 0) or high nibbles of n code bytes, as bytes."""
    return vec & T.broadcast(T.uint8(15), n) if half == 0 else T.shift_right(vec, T.broadcast(T.uint8(4), n))


def _pair_sums(T, codes, x):
    """AVX2 `vpmaddubsw`: per int16 lane, two unsigned code bytes times two signed activation bytes."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", codes, x)


def _widen(T, p16):
    """AVX2 `vpmaddwd` by 1s: adjacent int16 pair sums added into int32 lanes."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", p16, T.broadcast(T.int16(1), 16))


def _dot(T, isa_name: str, bits: int, acc, codes, word):
    """acc (int32 x lanes) + per lane the dot product of its 4 code bytes and the 4 activation
    bytes of `word`."""
    lanes = LANES[isa_name]
    x = T.reinterpret(f"int8x{4 * lanes}", T.broadcast(word, lanes))
    if isa_name == "vnni512":
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, codes, x)
    if isa_name == "dotprod":
        return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, codes, x)
    if bits == 8:  # |w| x sign(w) * x: both within 8 bits, no saturation in the pair sums
        x = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", x, codes)
        codes = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", codes, codes)
    if isa_name == "avxvnni":  # the VEX-encoded vpdpbusd (AVX-VNNI: Alder Lake, N100, Zen 5)
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, codes, x)
    return acc + _widen(T, _pair_sums(T, codes, x))


def _shape(lead, var, last: int):
    return [d if isinstance(d, int) else var for d in lead] + [last]


def _zero_term(T, zero, has_zero: bool, panel, g, xsum):
    """zero * xscale * sum(xq) of a group, or nothing for symmetric codes."""
    if not has_zero:
        return T.broadcast(T.float32(0), PANEL)
    return _widened(T, zero, panel, g) * T.broadcast(xsum, PANEL)


def _widened(T, buf, panel, g):
    """The 16 scales (or zeros) of a panel's group as fp32 (`vcvtph2ps` / `fcvtl` from fp16)."""
    vec = buf.vload([panel, g, 0], f"{buf.dtype}x{PANEL}")
    return vec if buf.dtype == "float32" else T.Cast(f"float32x{PANEL}", vec)


def _dot_nibbles(T, acc, cols, word_lo, word_hi):
    """AVX2, 4-bit codes: the low and high nibbles' vpmaddubsw pairs added as int16 before one
    vpmaddwd (|sum| <= 4 x 15 x 127 = 7,620: no overflow), a vpmaddwd and an add fewer per load."""
    lo, hi = (T.reinterpret("int8x32", _nibbles(T, cols, 32, h)) for h in (0, 1))
    x_lo, x_hi = (T.reinterpret("int8x32", T.broadcast(w, 8)) for w in (word_lo, word_hi))
    return acc + _widen(T, _pair_sums(T, lo, x_lo) + _pair_sums(T, hi, x_hi))


def primfunc(x_shape, n_out: int, k_dim: int, groups: int, bits: int, isa_name: str, *, chunk: int | None = None,
             zero: bool = True, scale_dtype: str = "float16"):
    """The `isa_name` kernel (one of ISAS) for x [*x_shape] (last dim k_dim) times packed codes of `bits` with
    scale/zero [N / 16, groups, 16] of `scale_dtype` (fp16 as the host packs them, or fp32; `zero`
    False: symmetric codes, no zero tensor); writes y [*x_shape[:-1], n_out].

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
        raise ValueError("dense_int8act: at most one symbolic row dim")
    static_rows = 1
    for d in lead:
        static_rows *= d if isinstance(d, int) else 1
    symbolic = bool(sym)
    R = static_rows if not symbolic and static_rows <= MAX_ROWS[isa_name] else int(chunk or CHUNK)  # rows per chunk
    K, N, G = int(k_dim), int(n_out), int(groups)
    group = K // G
    P = N // PANEL
    KB = K // 2 if bits == 4 else K  # code rows per panel
    loads = group // 8 if bits == 4 else group // 4  # 64-byte loads per group and panel
    per = 2 if bits == 4 else 1  # dot products per load and column (4-bit: low and high nibbles)
    words = loads * per  # int32 activation words per group
    PT, ahead, NCH, L = TILE_PANELS, AHEAD, CHAINS[isa_name], LANES[isa_name]
    tiles = P // PT
    code_t = "uint8" if bits == 4 else "int8"
    has_zero = zero
    pair = isa_name == "avx2" and bits == 4  # both nibbles of a load in one vpmaddwd (_dot_nibbles)

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
                            T.evaluate(prefetch(wf[(nxt * KB + g * (KB // G) + ln * 4) * PANEL]))
                        T.evaluate(prefetch(scale[nxt, g, 0]))
                        if has_zero:
                            T.evaluate(prefetch(zero[nxt, g, 0]))
                    for r in T.unroll(R):
                        for p in T.unroll(PT):
                            for h in T.unroll(NCH):
                                ia[r, p, h, 0:PANEL] = T.broadcast(T.int32(0), PANEL)
                    for i in T.unroll(loads):
                        for p in T.unroll(PT):
                            if pair:
                                for r in T.unroll(R):
                                    for v in T.unroll(PANEL // L):
                                        ia[r, p, 0, v * L:v * L + L] = _dot_nibbles(
                                            T, ia.vload([r, p, 0, v * L], f"int32x{L}"),
                                            _columns(T, wf, ((t * PT + p) * KB + g * (KB // G) + i * 4) * PANEL, bits, L, v),
                                            xq[T.min(c * R + r, rows - 1), g * words + i * 2], xq[T.min(c * R + r, rows - 1), g * words + i * 2 + 1])
                            else:
                                for h in T.unroll(per):
                                    for r in T.unroll(R):
                                        for v in T.unroll(PANEL // L):
                                            ia[r, p, (i * per + h) % NCH, v * L:v * L + L] = _dot(
                                                T, isa_name, bits, ia.vload([r, p, (i * per + h) % NCH, v * L], f"int32x{L}"), _codes(
                                                    T, _columns(T, wf, ((t * PT + p) * KB + g * (KB // G) + i * 4) * PANEL, bits, L, v), bits, h,
                                                    isa_name), xq[T.min(c * R + r, rows - 1), g * words + i * per + h])
                    for r in T.unroll(R):
                        for p in T.unroll(PT):
                            acc[r, p, 0:PANEL] = acc.vload([r, p, 0], "float32x16") + T.Cast("float32x16", tree(operator.add,
                                [ia.vload([r, p, j, 0], "int32x16") for j in range(NCH)]) - T.broadcast(
                                    xqsum[T.min(c * R + r, rows - 1), g] * (128 if bits == 8 and isa_name == "vnni512" else 0), PANEL)) * (
                                _widened(T, scale, t * PT + p, g) * T.broadcast(xs[T.min(c * R + r, rows - 1), g], PANEL)
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
        def dense_int8act(var_x: T.handle, wq: T.Buffer((P, KB, PANEL), code_t), scale: T.Buffer((P, G, PANEL), scale_dtype),
                       zero: T.Buffer((P, G, PANEL), scale_dtype), var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            entry(var_x, wq, scale, zero, var_y)
    else:  # symmetric codes: no zero tensor
        @T.prim_func(private=True)
        def dense_int8act(var_x: T.handle, wq: T.Buffer((P, KB, PANEL), code_t), scale: T.Buffer((P, G, PANEL), scale_dtype),
                       var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            entry(var_x, wq, scale, scale, var_y)

    return dense_int8act
