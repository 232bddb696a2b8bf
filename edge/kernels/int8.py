"""int8 x int8 -> int32 kernels: per-row activation quantization and the quantized dense.

The host rewrite (deploy/quantize/int8/scheme.py) turns `x @ W` (W a weight) into two calls:

    q, xs = quantize_rows(x)                      # per row: xs = max|x| / 127, q = round(x / xs)
    y     = qdense(q, xs, Wp, wcomp, ws, bias)   # y = (q @ Wq - wcomp) * xs * ws + bias

Weights are quantized on the host (symmetric, per output column, range [-127, 127]) and packed
into `[N / 16, K / 4, 16, 4]` panels: for every group of 4 k's, 16 columns x 4 bytes, exactly the
operand of one 512-bit VNNI `vpdpbusd`, two AVX2 256-bit halves or four NEON 128-bit `sdot`s. The
dense keeps a `rows x 16*panels` int32 tile in registers (`TILES`), walks K in steps of 4 and dequantizes once in
the epilogue (one int32 -> fp32 convert, two multiplies, the bias add, and optionally the GELU that
follows the matmul: `EPILOGUES`).

Micro-kernels per ISA (`isa_of(target)`), all exact in int32:
- `vnni512`: `vpdpbusd` wants u8 x s8, so activations are stored shifted by +128 (u8) and the
  epilogue subtracts `wcomp = 128 * sum_k Wq[k, n]`.
- `avxvnni` (AVX-VNNI without AVX-512: Alder Lake, N100, Zen 5): the same in 256 bits (the
  VEX-encoded `vpdpbusd`), the same +128 and `wcomp`.
- `avx2`: `vpmaddubsw` (u8 x s8 -> s16, saturating) on |a| and sign(a) * w, then `vpmaddwd` with 1s.
  With both operands in [-127, 127] a pair sums to at most 2 * 127 * 127 = 32258 < 32767: no
  saturation, unlike the u8 x s8 form that makes ORT offer `reduce_range`.
- `dotprod` (aarch64 +dotprod): `sdot`, s8 x s8.
- `neon` (aarch64 without dotprod): `smull` + `saddlp` + `addp`, s8 x s8.
- `generic`: plain int32 arithmetic that LLVM vectorizes as it can.
For the s8 ISAs `wcomp` is all zeros and unused.

The row count (batch x sequence) may be symbolic: the last partial row tile reads a clamped row and
skips its stores. Every PrimFunc here is complete (`tir.is_scheduled`), so other schedule rules
leave it alone.
"""

from __future__ import annotations

import numpy as np

KERNEL_ATTR = "edgejit.int8_kernel"
PANEL = 16  # output columns per packed panel
KGROUP = 4  # k values per packed group
# Register tile (rows, 16-column panels) per ISA. Measured at 128 rows on MiniLM's shapes, one
# thread: VNNI 6x2 runs the three matmuls in 0.41 ms (4x1: 0.69, 8x2 and 4x3 spill); AVX2 tiles
# from 2x1 to 8x2 are within 6% (ALU bound), 2x2 the best; ARM: 4x1 (16 of 32 NEON registers).
TILES = {"vnni512": (6, 2), "avxvnni": (2, 2), "avx2": (2, 2), "dotprod": (4, 1), "neon": (4, 1)}


def isa_of(target) -> str:
    """Pick the micro-kernel for a tvm.target.Target (or its JSON dict)."""
    if isinstance(target, dict):
        triple, mattr, mcpu = target.get("mtriple", ""), list(target.get("mattr", [])), target.get("mcpu", "")
    else:
        triple = str(target.attrs.get("mtriple", "") or "")
        mattr = [str(a) for a in (target.attrs.get("mattr", None) or [])]
        mcpu = str(target.attrs.get("mcpu", "") or "")
    if triple.startswith("aarch64"):
        return "dotprod" if "+dotprod" in mattr else "neon"
    if triple.startswith("x86_64") or triple == "":
        if "+avx512vnni" in mattr and "+avx512bw" in mattr:
            return "vnni512"
        if "+avxvnni" in mattr:
            return "avxvnni"
        if "+avx2" in mattr or mcpu in _AVX2_CPUS:
            return "avx2"
    return "generic"


# CPUs whose LLVM model implies AVX2 (the VNNI kernels need +avx512vnni/+avx512bw spelled out).
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "cascadelake", "icelake-server", "sapphirerapids",
              "alderlake", "znver1", "znver2", "znver3", "znver4", "znver5"}


def activation_dtype(isa: str) -> str:
    return "uint8" if isa in ("vnni512", "avxvnni") else "int8"


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (int8 [K, N] in [-127, 127], fp32 scales [N]); symmetric per column."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def pack_weight(wq: np.ndarray, isa: str) -> tuple[np.ndarray, np.ndarray]:
    """int8 [K, N] -> (panels [N/16, K/4, 16, 4], int32 compensation [N] for the u8 ISAs)."""
    k, n = wq.shape
    panels = np.ascontiguousarray(wq.reshape(k // KGROUP, KGROUP, n // PANEL, PANEL).transpose(2, 0, 3, 1))
    if activation_dtype(isa) == "uint8":
        comp = (128 * wq.astype(np.int32).sum(axis=0)).astype(np.int32)
    else:
        comp = np.zeros(n, dtype=np.int32)
    return panels, comp


def supported(k: int, n: int) -> bool:
    """Shapes the kernels handle (vector-width multiples); others stay in float."""
    return k % PANEL == 0 and n % PANEL == 0


def _tile(isa: str, n: int) -> tuple[int, int]:
    rows, panels = TILES[isa]
    return rows, panels if (n // PANEL) % panels == 0 else 1


def _mark(func, kind: str):
    # op_pattern 8 = kOpaque: never fused into other kernels.
    return func.with_attr(KERNEL_ATTR, kind).with_attr("tir.is_scheduled", True).with_attr("tir.noalias", True).with_attr("op_pattern", 8)


def quantize_rows(k: int, isa: str, *, static: bool = False):
    """PrimFunc: x fp32 [M, K] (+ scale fp32 [1] when static) -> (q [M, K], xs fp32 [M]).

    Dynamic: xs[m] = max|x[m]| / 127 (1 for an all-zero row). Static: xs[m] = scale[0].
    Serial: a few microseconds per call, less than waking the thread pool costs (measured 11 us
    serial vs 16 us on 2 threads for 128 x 384).
    """
    from tvm.script import tirx as T

    qdtype = activation_dtype(isa)
    lanes = PANEL
    shift = 128.0 if qdtype == "uint8" else 0.0
    vq = f"{qdtype}x{lanes}"

    def quantize(v, inv):
        r = T.round(v * T.broadcast(inv, lanes))
        r = T.max(T.min(r, T.broadcast(T.float32(127.0), lanes)), T.broadcast(T.float32(-127.0), lanes))
        return T.Cast(vq, r + T.broadcast(T.float32(shift), lanes))

    if static:
        @T.prim_func(s_tir=True)
        def func(x: T.handle, s: T.handle, q: T.handle, xs: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, k), "float32")
            S = T.match_buffer(s, (1,), "float32")
            Q = T.match_buffer(q, (M, k), qdtype)
            XS = T.match_buffer(xs, (M,), "float32")
            with T.sblock("root"):
                for m in range(M):
                    XS[m] = S[0]
                    for kb in range(k // lanes):
                        Q[m, T.ramp(kb * lanes, 1, lanes)] = quantize(X.vload([m, kb * lanes], f"float32x{lanes}"), T.float32(1.0) / S[0])

        return _mark(func, "quantize_static")

    @T.prim_func(s_tir=True)
    def func(x: T.handle, q: T.handle, xs: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, k), "float32")
        Q = T.match_buffer(q, (M, k), qdtype)
        XS = T.match_buffer(xs, (M,), "float32")
        with T.sblock("root"):
            for m in range(M):
                acc = T.alloc_buffer((lanes,), "float32", scope=_STACK)
                amax = T.alloc_buffer((1,), "float32", scope=_STACK)
                acc[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                for kb in range(k // lanes):
                    acc[T.ramp(0, 1, lanes)] = T.max(acc.vload([0], f"float32x{lanes}"), T.fabs(X.vload([m, kb * lanes], f"float32x{lanes}")))
                amax[0] = T.float32(0)
                for j in range(lanes):
                    amax[0] = T.max(amax[0], acc[j])
                XS[m] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127.0), T.float32(1.0))
                for kb in range(k // lanes):
                    Q[m, T.ramp(kb * lanes, 1, lanes)] = quantize(X.vload([m, kb * lanes], f"float32x{lanes}"), T.float32(1.0) / XS[m])

    return _mark(func, "quantize_dynamic")


# Scope of the small per-tile scratch buffers. TVM 0.27 turns every "local" allocation on CPU into
# a TVMBackendAllocWorkspace heap block, and LLVM then stores the accumulators to it after every
# vpdpbusd; a small "global" allocation becomes an alloca, which LLVM keeps in registers.
_STACK = "global"

_SUB_LANES = {"vnni512": 16, "avxvnni": 8, "avx2": 8, "dotprod": 4, "neon": 4}


def _update(isa: str):
    """(acc int32xL, a4 = 4 activation bytes as int32, b = 4*L weight bytes) -> acc + a . b per lane."""
    from tvm.script import tirx as T

    if isa == "vnni512":
        def upd(acc, a4, b):
            a = T.reinterpret("int8x64", T.broadcast(a4, 16))
            return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, a, b)
    elif isa == "avxvnni":
        def upd(acc, a4, b):
            a = T.reinterpret("int8x32", T.broadcast(a4, 8))
            return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, a, b)
    elif isa == "avx2":
        def upd(acc, a4, b):
            a = T.reinterpret("int8x32", T.broadcast(a4, 8))
            absa = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", a, a)
            sb = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", b, a)
            p16 = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", absa, sb)
            return acc + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", p16, T.broadcast(T.int16(1), 16))
    elif isa == "dotprod":
        def upd(acc, a4, b):
            a = T.reinterpret("int8x16", T.broadcast(a4, 4))
            return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)
    elif isa == "neon":
        def upd(acc, a4, b):
            a = T.reinterpret("int8x8", T.broadcast(a4, 2))
            lo = T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a, T.vectorlow("int8x8", b))
            hi = T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a, T.vectorhigh("int8x8", b))
            lo = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", lo)
            hi = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", hi)
            return acc + T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.addp.v4i32", lo, hi)
    else:
        raise AssertionError(isa)
    return upd


_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def gelu(v, lanes: int):
    """v * 0.5 * (1 + erf(v / sqrt 2)) on a float32 vector, with the rational erf approximation
    TVM's fast_erf and Eigen use (|error| < 4e-7): libm's erff would be called lane by lane."""
    from tvm.script import tirx as T

    def c(x):
        return T.broadcast(T.float32(x), lanes) if lanes > 1 else T.float32(x)

    x = T.max(T.min(v * c(0.7071067811865476), c(4.0)), c(-4.0))
    x2 = x * x
    p = x2 * c(_ERF_NUM[0]) + c(_ERF_NUM[1])
    for a in _ERF_NUM[2:]:
        p = x2 * p + c(a)
    q = x2 * c(_ERF_DEN[0]) + c(_ERF_DEN[1])
    for b in _ERF_DEN[2:]:
        q = x2 * q + c(b)
    return v * c(0.5) * (c(1.0) + x * p / q)


_TANH_NUM = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
             1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_DEN = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def gelu_tanh(v, lanes: int):
    """GPT-2's GELU, v * 0.5 * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 v^3))), with the rational
    tanh approximation of TVM's fast_tanh / Eigen."""
    from tvm.script import tirx as T

    def c(x):
        return T.broadcast(T.float32(x), lanes) if lanes > 1 else T.float32(x)

    y = c(0.7978845608028654) * (v + c(0.044715) * v * v * v)
    x = T.max(T.min(y, c(7.90531110763549805)), c(-7.90531110763549805))
    x2 = x * x
    p = x2 * c(_TANH_NUM[0]) + c(_TANH_NUM[1])
    for a in _TANH_NUM[2:]:
        p = x2 * p + c(a)
    q = x2 * c(_TANH_DEN[0]) + c(_TANH_DEN[1])
    for b in _TANH_DEN[2:]:
        q = x2 * q + c(b)
    return v * c(0.5) * (c(1.0) + x * p / q)


EPILOGUES = {"none": None, "gelu": gelu, "gelu_tanh": gelu_tanh}


def qdense(k: int, n: int, isa: str, epilogue: str = "none"):
    """PrimFunc: (q [M, K], xs [M], Wp [N/16, K/4, 16, 4] int8, wcomp int32 [N], ws fp32 [N],
    bias fp32 [N]) -> y fp32 [M, N]; `epilogue` "gelu" (erf) or "gelu_tanh" applies that GELU to y."""
    from tvm.script import tirx as T

    qdtype = activation_dtype(isa)
    if isa == "generic":
        return _qdense_generic(k, n, qdtype, epilogue)
    npanel = n // PANEL
    rows, per_tile = _tile(isa, n)
    width = PANEL * per_tile
    kg = k // KGROUP
    lanes = _SUB_LANES[isa]
    sub = PANEL // lanes
    upd = _update(isa)
    vacc = f"int32x{lanes}"
    vb = f"int8x{lanes * KGROUP}"
    act = EPILOGUES[epilogue] or (lambda v, _lanes: v)

    # Loops marked unroll are unrolled by TVM, so the accumulator indices become constants and
    # LLVM keeps the whole rows x width tile in vector registers.
    @T.prim_func(s_tir=True)
    def func(q: T.handle, xs: T.handle, w: T.handle, wcomp: T.handle, ws: T.handle, b: T.handle, y: T.handle):
        M = T.int64()
        Q = T.match_buffer(q, (M, k), qdtype)
        XS = T.match_buffer(xs, (M,), "float32")
        W = T.match_buffer(w, (npanel, kg, PANEL, KGROUP), "int8")
        WC = T.match_buffer(wcomp, (n,), "int32")
        WS = T.match_buffer(ws, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        Y = T.match_buffer(y, (M, n), "float32")
        with T.sblock("root"):
            for jt in T.parallel(npanel // per_tile):
                for mt in range((M + rows - 1) // rows):
                    acc = T.alloc_buffer((rows, width), "int32", scope=_STACK)
                    for i in T.unroll(rows):
                        acc[i, T.ramp(0, 1, width)] = T.broadcast(0, width)
                    for kk in range(kg):
                        for i in T.unroll(rows):
                            for p in T.unroll(per_tile):
                                for h in T.unroll(sub):
                                    acc[i, T.ramp(p * PANEL + h * lanes, 1, lanes)] = upd(
                                        acc.vload([i, p * PANEL + h * lanes], vacc),
                                        T.reinterpret("int32", Q.vload([T.min(mt * rows + i, M - 1), kk * KGROUP], f"{qdtype}x4")),
                                        W.vload([jt * per_tile + p, kk, h * lanes, 0], vb),
                                    )
                    for i in T.unroll(rows):
                        if mt * rows + i < M:
                            Y[mt * rows + i, T.ramp(jt * width, 1, width)] = act(
                                T.Cast(f"float32x{width}", acc.vload([i, 0], f"int32x{width}") - WC.vload([jt * width], f"int32x{width}"))
                                * T.broadcast(XS[mt * rows + i], width)
                                * WS.vload([jt * width], f"float32x{width}")
                                + B.vload([jt * width], f"float32x{width}"),
                                width,
                            )

    return _mark(func, f"qdense_{isa}")


def _qdense_generic(k: int, n: int, qdtype: str, epilogue: str):
    from tvm.script import tirx as T

    act = (lambda v: EPILOGUES[epilogue](v, 1)) if EPILOGUES[epilogue] else (lambda v: v)

    npanel = n // PANEL
    kg = k // KGROUP

    @T.prim_func(s_tir=True)
    def func(q: T.handle, xs: T.handle, w: T.handle, wcomp: T.handle, ws: T.handle, b: T.handle, y: T.handle):
        M = T.int64()
        Q = T.match_buffer(q, (M, k), qdtype)
        XS = T.match_buffer(xs, (M,), "float32")
        W = T.match_buffer(w, (npanel, kg, PANEL, KGROUP), "int8")
        WC = T.match_buffer(wcomp, (n,), "int32")
        WS = T.match_buffer(ws, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        Y = T.match_buffer(y, (M, n), "float32")
        with T.sblock("root"):
            for m in T.parallel(M):
                acc = T.alloc_buffer((n,), "int32", scope="local")
                for j in range(n):
                    acc[j] = 0 - WC[j]
                for kk, jp, j, t in T.grid(kg, npanel, PANEL, KGROUP):
                    acc[jp * PANEL + j] = acc[jp * PANEL + j] + T.Cast("int32", Q[m, kk * KGROUP + t]) * T.Cast("int32", W[jp, kk, j, t])
                for j in range(n):
                    Y[m, j] = act(T.Cast("float32", acc[j]) * XS[m] * WS[j] + B[j])

    return _mark(func, "qdense_generic")
