"""Llama (SmolLM2, TinyLlama, Llama 3.x): RMSNorm, RoPE, SwiGLU, grouped-query attention."""

from deploy.models.llama.loader import (config_from_gguf, config_from_hf, linear_weights, params, plan_quantization,
                                        weights_from_gguf, weights_from_hf)
from deploy.models.llama.model import LlamaConfig as Config
from deploy.models.llama.model import LlamaForCausalLM as Model

__all__ = ["Config", "Model", "config_from_gguf", "weights_from_gguf", "config_from_hf", "weights_from_hf", "params",
           "linear_weights", "plan_quantization"]
