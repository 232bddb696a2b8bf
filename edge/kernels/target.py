"""What the schedules need to know about a TVM CPU target: vector width and register tile."""

from __future__ import annotations

# LLVM CPU names with AVX-512 (used when the target names a CPU but lists no +avx512f).
_AVX512_CPUS = {
    "skylake-avx512", "cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
    "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5", "x86-64-v4",
}


def _attrs(target) -> tuple[str, str, list[str]]:
    attrs = target.attrs
    triple = str(attrs["mtriple"]) if "mtriple" in attrs else ""
    mcpu = str(attrs["mcpu"]) if "mcpu" in attrs else ""
    mattr = [str(a) for a in attrs["mattr"]] if "mattr" in attrs else []
    return triple, mcpu, mattr


def is_aarch64(target) -> bool:
    triple, mcpu, mattr = _attrs(target)
    return triple.startswith(("aarch64", "arm64"))


def vector_bits(target) -> int:
    triple, mcpu, mattr = _attrs(target)
    if is_aarch64(target):
        return 128  # NEON (SVE is not used)
    if "+avx512f" in mattr or mcpu in _AVX512_CPUS:
        return 512
    if "+avx2" in mattr or "+avx" in mattr or mcpu in {"haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "x86-64-v3", "alderlake"}:
        return 256
    return 128


def vector_lanes(target, dtype_bits: int = 32) -> int:
    return vector_bits(target) // dtype_bits


def tile_rows(target) -> int:
    """Rows of the dense register tile (see tile_panels for its columns).

    AVX-512: 8 rows x 2 panels x 1 zmm = 16 of 32 registers (8x1: 140-218 GFLOP/s, 8x2: 243-257 on
    one Zen 5 core); AVX2: 6 rows x 1 panel x 2 ymm = 12 of 16 registers (+7% over 4 rows; 8 rows
    or 2 panels spill); NEON: 4 rows x 4 q-registers = 16 of 32 registers. Enough independent FMAs
    in flight to cover their latency, few enough loads per FMA.
    """
    bits = vector_bits(target)
    if bits >= 512:
        return 8
    if bits == 256 and not is_aarch64(target):
        return 6
    return 4


def decode_tile_rows(target) -> int:
    """Rows of the dense register tile for a decode step with a symbolic number of sequences
    (usually 1-8; the generic module). Past the last row a tile re-reads that row, so an 8-row tile
    costs a single sequence 8 rows of work. 576 x 3072 4-bit, one Zen 5 core, CPU time, weights in
    cache: 8 rows 163 us for 1-8 sequences; 4 rows 67 us for 1-4, 137 us for 8; 2 rows 51 us for
    1-2, 204 us for 8. JIT variants for the decode batch sizes seen get a tile of exactly their rows
    (and, with 1-2 rows, the K split and prefetches of edge/kernels/dense.py)."""
    return min(4, tile_rows(target))


def tile_panels(target) -> int:
    """16-column weight panels per dense register tile (see tile_rows)."""
    return 2 if vector_bits(target) >= 512 else 1
