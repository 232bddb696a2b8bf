"""Text generation on the device: the decoder with its KV cache, tokenizer, chat template,
sampler and streaming detokenizer, and `Generator` (chat / complete yielding text pieces)."""

from edge.generate.engine import GenerationStats
from edge.generate.generator import Generator
from edge.generate.sampler import SamplingParams

__all__ = ["Generator", "GenerationStats", "SamplingParams"]
