"""Qwen2 / Qwen2.5: Llama with biases on the q/k/v projections (its own rope_theta, tied or untied
head). The definition is Llama's (deploy/models/llama/model.py, `qkv_bias`); this package maps
Qwen2's files onto it."""

from deploy.models.llama.model import LlamaConfig as Config
from deploy.models.llama.model import LlamaForCausalLM as Model
from deploy.models.llama.loader import linear_weights, params, plan_quantization
from deploy.models.qwen2.loader import config_from_gguf, config_from_hf, weights_from_gguf, weights_from_hf

__all__ = ["Config", "Model", "config_from_gguf", "weights_from_gguf", "config_from_hf", "weights_from_hf", "params",
           "linear_weights", "plan_quantization"]
