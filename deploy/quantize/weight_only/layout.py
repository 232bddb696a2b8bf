"""Group-quantized weights on the host: the QWeight form (integer codes + scale and zero per group
of 32 inputs: w = q * scale + zero), how GGUF blocks become one, how fp32 weights are quantized,
and how the result is packed for the kernel.

Kernel layout (edge/kernels/dense.compute_quant), for a weight W [K, N] (in x out):
- 8 bits: int8 codes [N / 16, K, 16];
- 4 bits: uint8 [N / 16, K / 2, 16], code of input 2i in the low nibble of byte i, 2i + 1 high;
- scale, zero: float16 [N / 16, K / 32, 16] (symmetric 8-bit layers, Q8S: no zero), as GGUF stores
  them: a decode step reads 20 bytes per 32 4-bit weights, not the 24 of fp32 scale and zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
PANEL = 16
# A linear layer's storage in a model config's `quant` map: 4 / 8 (group-quantized codes, above) or
# F16: fp16 weights as a GGUF F16 file holds them, packed [N / 16, K, 16] and widened to fp32 in
# the kernel's inner loop (half the bytes of fp32, the same values).
F16 = 16
# Q8S: 8-bit codes whose zeros are all 0 (Q8_0, --precision q8: w = q * scale): stored without the
# zero tensor, 1/9 fewer bytes for a decode step to read. Shown as q8.
Q8S = 9


def storage_name(bits: int) -> str:
    return "f16" if bits == F16 else "q8" if bits == Q8S else f"q{bits}"


def code_bits(storage: int) -> int:
    """Bits per code of a quantized storage kind (4, 8 or Q8S)."""
    return 8 if storage == Q8S else storage


def storage_of(parts: list) -> int | None:
    """How a linear layer fused from these matrices is stored: 4 or 8 bits when all came
    quantized (4-bit parts widen exactly when fused with 8-bit ones; 8 bits with no zero, Q8S,
    when every part is symmetric 8-bit), F16 when all came fp16, else None (fp32)."""
    if all(isinstance(p, QWeight) for p in parts):
        bits = max(p.bits for p in parts)
        return Q8S if bits == 8 and all(p.bits == 8 and not np.any(p.zero) for p in parts) else bits
    if all(isinstance(p, np.ndarray) and p.dtype == np.float16 for p in parts):
        return F16
    return None


@dataclass
class QWeight:
    """A matrix in Hugging Face layout [out, in], group-quantized along `in`."""

    q: np.ndarray  # codes [out, in]: uint8 0..15 (bits 4) or int8 (bits 8)
    scale: np.ndarray  # float32 [out, in / 32], values fp16 holds (the kernel layout is fp16)
    zero: np.ndarray  # float32 [out, in / 32], the same
    bits: int
    source: str  # what it was made from, e.g. "Q4_1" or "requantized from Q6_K"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        s = np.repeat(self.scale, GROUP, axis=1)
        z = np.repeat(self.zero, GROUP, axis=1)
        return self.q.astype(np.float32) * s + z

    def rows(self, index) -> "QWeight":
        return QWeight(self.q[index], self.scale[index], self.zero[index], self.bits, self.source)

    def as_bits(self, bits: int) -> "QWeight":
        """Widen 4-bit codes to 8-bit storage (exact: same codes, scale and zero)."""
        if bits == self.bits:
            return self
        if bits == 8 and self.bits == 4:
            return QWeight(self.q.astype(np.int8), self.scale, self.zero, 8, self.source)
        raise ValueError(f"cannot narrow {self.bits}-bit codes to {bits} bits")


def concat_rows(parts: list[QWeight]) -> QWeight:
    """Stack matrices along `out` (fused q/k/v, gate/up): the widest storage wins (exactly)."""
    bits = max(p.bits for p in parts)
    parts = [p.as_bits(bits) for p in parts]
    return QWeight(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                   np.concatenate([p.zero for p in parts]), bits, "+".join(sorted({p.source for p in parts})))


# -- from GGUF blocks --------------------------------------------------------------------------
def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def from_gguf(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> QWeight | None:
    """GGUF blocks (uint8 [rows, bytes per row]) of a [rows, cols] matrix -> QWeight, exactly
    for Q8_0, Q4_0 and Q4_1; None for types that are not group-of-32 affine codes."""
    rows, cols = shape
    nb = cols // GROUP
    if kind == "Q8_0":  # per block: d (f16), 32 x int8; w = d * q
        b = raw.reshape(rows, nb, 34)
        d = _f16(b[:, :, :2]).reshape(rows, nb)
        q = b[:, :, 2:].copy().view(np.int8).reshape(rows, cols)
        return QWeight(q, d, np.zeros_like(d), 8, kind)
    if kind in ("Q4_0", "Q4_1"):  # d (f16) [m (f16)], 16 bytes: element j low nibble, j + 16 high
        size = 18 if kind == "Q4_0" else 20
        b = raw.reshape(rows, nb, size)
        d = _f16(b[:, :, :2]).reshape(rows, nb)
        m = _f16(b[:, :, 2:4]).reshape(rows, nb) if kind == "Q4_1" else -8.0 * d
        nib = b[:, :, size - 16:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=2).reshape(rows, cols)
        return QWeight(q.astype(np.uint8), d, m.astype(np.float32), 4, kind)
    return None


def quantize(w: np.ndarray, bits: int, source: str) -> QWeight:
    """fp32 [out, in] -> QWeight: 8 bits symmetric (absmax), 4 bits affine (min/max) per group;
    the codes are those of llama.cpp's reference quantizers (ggml-quants.c quantize_row_q8_0_ref /
    q4_1_ref: x times the reciprocal of the fp32 scale, rounded half away from zero); the scale and
    zero are then rounded to fp16, as llama.cpp stores them (the kernel layout is fp16)."""
    out, cols = w.shape
    g = w.reshape(out, cols // GROUP, GROUP).astype(np.float32)
    if bits == 8:
        d = np.abs(g).max(axis=2) / np.float32(127)
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
        x = g * inv[..., None]
        q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)  # roundf
        scale = np.where(d > 0, d, 1).astype(np.float32)  # any scale decodes all-zero codes
        return QWeight(q.reshape(out, cols), _fp16(scale), np.zeros_like(scale), 8, source)
    lo, hi = g.min(axis=2), g.max(axis=2)
    d = (hi - lo) / np.float32(15)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.trunc((g - lo[..., None]) * inv[..., None] + np.float32(0.5)), 0, 15).astype(np.uint8)
    scale = np.where(d > 0, d, 1).astype(np.float32)
    return QWeight(q.reshape(out, cols), _fp16(scale), _fp16(lo), 4, source)


def _fp16(a: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest fp16 (kept fp32 on the host)."""
    return a.astype(np.float16).astype(np.float32)


# -- for the kernel ----------------------------------------------------------------------------
def pack(w: QWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF-layout QWeight [N, K] -> (codes, scale, zero) in the kernel layout (N padded to 16;
    scale and zero fp16: exact for GGUF's blocks and for `quantize`'s, which round them)."""
    q, s, z = w.q, w.scale, w.zero
    n = q.shape[0]
    pad = (-n) % PANEL
    if pad:
        q = np.pad(q, ((0, pad), (0, 0)))
        s = np.pad(s, ((0, pad), (0, 0)), constant_values=1.0)
        z = np.pad(z, ((0, pad), (0, 0)))
    npan = q.shape[0] // PANEL
    qp = q.reshape(npan, PANEL, -1).transpose(0, 2, 1)  # [P, K, 16]
    if w.bits == 4:
        qp = (qp[:, 0::2, :] | (qp[:, 1::2, :] << 4)).astype(np.uint8)
    sp = s.reshape(npan, PANEL, -1).transpose(0, 2, 1)
    zp = z.reshape(npan, PANEL, -1).transpose(0, 2, 1)
    return np.ascontiguousarray(qp), np.ascontiguousarray(sp, dtype=np.float16), np.ascontiguousarray(zp, dtype=np.float16)
