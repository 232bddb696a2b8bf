"""Weight-only quantization for decoders: 4- and 8-bit weights with a scale and zero per group of
32 inputs, dequantized inside the dense kernel (edge/kernels/dense.compute_quant); GGUF blocks
repacked into that layout without going through fp32 where the formats agree."""
