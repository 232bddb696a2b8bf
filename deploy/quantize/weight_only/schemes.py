"""`edgejit compile --precision q4|q8` for decoders read in float (Hugging Face checkpoint
directories, ONNX decoders with past key values, GGUF files whose matrices are F32/F16/BF16): every
linear layer's weights quantized on the host with layout.quantize (round to nearest, per group of
32 inputs), kept in the QWeight form the model loaders already take from GGUF files.

- q8: 8-bit symmetric codes, scale = absmax / 127 per group (llama.cpp's Q8_0).
- q4: 4-bit affine codes 0..15, scale = (max - min) / 15 and zero = min per group (llama.cpp's
  Q4_1); the LM head (the token embedding too when tied) gets q8, as llama.cpp's quantizer gives
  the output tensor a wider type than the blocks (Q6_K, or Q8_0 when its rows are not a multiple of
  256: SmolLM2's Q4_1 file holds it as Q8_0): one matrix, read once per token, whose errors land
  straight on the logits (and, tied, on every token's embedding).
Scales and zeros stay fp32 (the kernel reads them so); GGUF stores them as fp16.
A layer whose inputs are not a multiple of 32 stays fp32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edge.errors import EdgeJitError

from deploy.quantize.weight_only.layout import GROUP, QWeight, quantize


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    bits: int  # the blocks' linear layers
    head_bits: int  # the LM head (and the tied embedding)
    like: str  # the GGUF type it follows


SCHEMES = {"q8": Scheme("q8", 8, 8, "Q8_0"), "q4": Scheme("q4", 4, 8, "Q4_1")}
HEAD = "lm_head"  # the LM head's layer name in every model package's linear_weights()


def get(precision: str) -> Scheme:
    if precision not in SCHEMES:
        raise EdgeJitError(f"--precision {precision}: a decoder is compiled in fp32 or quantized with {', '.join(SCHEMES)}")
    return SCHEMES[precision]


def quantize_linears(weights: dict, linears: dict[str, list[tuple[str, bool]]], scheme: Scheme) -> dict:
    """Replace, in the state dict `weights`, every matrix of the layers in `linears` (a model
    package's linear_weights(cfg): layer -> [(name, stored transposed)]) by its QWeight [out, in];
    -> {"quantized": {layer: bits}, "float": [layers kept fp32]}."""
    quantized, kept = {}, []
    for layer, parts in linears.items():
        mats = [np.asarray(weights[n], dtype=np.float32) for n, _ in parts]
        mats = [m.T if transposed else m for m, (_, transposed) in zip(mats, parts)]
        if any(m.shape[1] % GROUP for m in mats):
            kept.append(layer)
            continue
        bits = scheme.head_bits if layer == HEAD else scheme.bits
        for (name, _), m in zip(parts, mats):
            weights[name] = quantize(m, bits, f"{scheme.name} from fp32")
        quantized[layer] = bits
    return {"quantized": quantized, "float": kept}


def dequantized(weights: dict, linears: dict[str, list[tuple[str, bool]]]) -> dict:
    """The state dict with every QWeight replaced by its fp32 values, in the layout the state dict
    stores that matrix (what a float reference reads)."""
    out = dict(weights)
    for parts in linears.values():
        for name, transposed in parts:
            if isinstance(weights[name], QWeight):
                w = weights[name].dequantize()
                out[name] = np.ascontiguousarray(w.T if transposed else w)
    return out
