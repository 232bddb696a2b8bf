"""Qwen2 weights from GGUF (general.architecture qwen2) or a Hugging Face checkpoint
(Qwen2ForCausalLM): Llama's loaders with q/k/v biases. llama.cpp's converter (Qwen2Model, a plain
TextModel) does not permute Q/K rows for qwen2, so none are un-permuted here."""

from __future__ import annotations

import dataclasses

from deploy.frontends.gguf.reader import GGUFFile
from deploy.models.llama import loader as llama
from deploy.models.llama.model import LlamaConfig


def config_from_gguf(f: GGUFFile) -> LlamaConfig:
    return dataclasses.replace(llama.config_from_gguf(f, "qwen2"), qkv_bias=True)


def weights_from_gguf(f: GGUFFile, cfg: LlamaConfig, **kw):
    return llama.weights_from_gguf(f, cfg, permuted=False, **kw)


def config_from_hf(config: dict, source: str = "config.json") -> LlamaConfig:
    return llama.config_from_hf(config, source, qkv_bias=True)


weights_from_hf = llama.weights_from_hf
