"""GPT-2 (GPT2LMHeadModel; GGUF gpt2): learned positions, LayerNorm, GELU, fused q/k/v with biases."""

from deploy.models.gpt2.loader import (config_from_gguf, config_from_hf, linear_weights, params, plan_quantization,
                                       weights_from_gguf, weights_from_hf)
from deploy.models.gpt2.model import GPT2Config as Config
from deploy.models.gpt2.model import GPT2LMHeadModel as Model

__all__ = ["Config", "Model", "config_from_gguf", "weights_from_gguf", "config_from_hf", "weights_from_hf", "params",
           "linear_weights", "plan_quantization"]
