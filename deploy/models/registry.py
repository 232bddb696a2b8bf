"""Architecture name -> model package; GGUF general.architecture and Hugging Face `architectures`
-> architecture name."""

from __future__ import annotations

import importlib

from edge.errors import ModelError

ARCHITECTURES = {
    "llama": "deploy.models.llama",
    "qwen2": "deploy.models.qwen2",
    "mistral": "deploy.models.mistral",
    "gpt2": "deploy.models.gpt2",
}
GGUF = ("llama", "qwen2", "gpt2")  # general.architecture values (llama.cpp writes Mistral as llama)
HF = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral", "GPT2LMHeadModel": "gpt2"}


def get(arch: str, *, source: str = "model"):
    """The model package for `arch`: it provides Config, Model, config_from_gguf / weights_from_gguf
    and config_from_hf / weights_from_hf (Hugging Face names and layout), params (the model's own
    parameters from those), linear_weights / plan_quantization (which matrices make each linear
    layer; which layers run weight-only quantized)."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"{source}: architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(ARCHITECTURES[arch])


def gguf_arch(arch: str, *, source: str) -> str:
    if arch not in GGUF:
        raise ModelError(f"{source}: architecture '{arch}' is not supported (supported: {', '.join(GGUF)})")
    return arch


def hf_arch(architectures, *, source: str) -> str:
    """config.json `architectures` (a list; its first entry is the model class) -> architecture name."""
    names = architectures if isinstance(architectures, list) else [architectures] if architectures else []
    if not names:
        raise ModelError(f"{source}: no 'architectures' (supported: {', '.join(HF)})")
    for n in names:
        if n in HF:
            return HF[n]
    raise ModelError(f"{source}: architecture '{names[0]}' is not supported (supported: {', '.join(HF)})")
