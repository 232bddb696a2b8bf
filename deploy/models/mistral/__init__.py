"""Mistral (MistralForCausalLM): Llama with a sliding attention window. The definition and loaders
are Llama's; a config whose sliding_window is shorter than its trained context gets a context of
at most the window (within it, sliding-window attention is full attention), so longer contexts
are refused at compile time. llama.cpp writes Mistral GGUF files as `llama`."""

from deploy.models.llama import Config, Model, config_from_hf, linear_weights, params, plan_quantization, weights_from_hf

__all__ = ["Config", "Model", "config_from_hf", "weights_from_hf", "params", "linear_weights", "plan_quantization"]
