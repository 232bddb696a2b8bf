"""Llama weights from a GGUF file onto the model definition (llama_model.py)."""

from __future__ import annotations

import numpy as np

from edge.errors import ModelError

from deploy.frontends.gguf.reader import GGUFFile
from deploy.models.llama.model import PANEL, LlamaConfig


def config_from_gguf(f: GGUFFile, arch: str = "llama") -> LlamaConfig:
    g = lambda k, d=None: f.get(f"{arch}.{k}", d)  # noqa: E731
    req = lambda k: f.require(f"{arch}.{k}")  # noqa: E731
    heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    head_dim = int(g("attention.key_length", hidden // heads))
    rot = int(g("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ModelError(f"{f.path.name}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported for {arch}")
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none") and not f.has("rope_freqs.weight"):
        raise ModelError(f"{f.path.name}: RoPE scaling '{scaling}' is not supported (supported: llama3 frequency factors)")
    vocab = g("vocab_size") or len(f.require("tokenizer.ggml.tokens"))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        num_hidden_layers=int(req("block_count")),
        vocab_size=int(vocab),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        head_dim=head_dim,
        tie_word_embeddings=not f.has("output.weight"),
        context_window_size=int(g("context_length", 2048)),
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which interleaves each head's Q/K rows for its RoPE layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_inv_freq(cfg: LlamaConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    if freq_factors is not None:
        inv = inv / freq_factors
    return inv.astype(np.float32)


def pack(w_out_in: np.ndarray) -> np.ndarray:
    """HF [out, in] -> packed [out / 16, in, 16]."""
    from edge.kernels import dense

    w = np.ascontiguousarray(w_out_in.T)
    if w.shape[1] % PANEL:
        w = np.pad(w, ((0, 0), (0, PANEL - w.shape[1] % PANEL)))
    return dense.pack_weight(w, PANEL)


def weights_from_gguf(f: GGUFFile, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The checkpoint in Hugging Face names and layout (Q/K rows un-permuted)."""
    out = {"model.embed_tokens.weight": f.tensor("token_embd.weight"), "model.norm.weight": f.tensor("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = f.tensor("output.weight")
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            w = f.tensor(f"blk.{i}.{g}.weight")
            if g == "attn_q":
                w = _unpermute(w, cfg.num_attention_heads)
            elif g == "attn_k":
                w = _unpermute(w, cfg.num_key_value_heads)
            out[f"model.layers.{i}.{h}.weight"] = w
    if f.has("rope_freqs.weight"):
        out["rope_freqs"] = f.tensor("rope_freqs.weight")
    return out


def params(hf: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> the model's parameters, by the names export_tvm gives them."""
    p = {}
    head = hf["model.embed_tokens.weight"] if cfg.tie_word_embeddings else hf["lm_head.weight"]
    p["lm_head.weight"] = pack(head)
    if not cfg.tie_word_embeddings:
        p["embed_tokens"] = np.ascontiguousarray(hf["model.embed_tokens.weight"], dtype=np.float32)
    p["norm.weight"] = hf["model.norm.weight"]
    p["rope_inv_freq"] = rope_inv_freq(cfg, hf.get("rope_freqs"))
    for i in range(cfg.num_hidden_layers):
        L = f"model.layers.{i}."
        q, k, v = (hf[L + f"self_attn.{n}_proj.weight"] for n in "qkv")
        p[f"layers.{i}.self_attn.qkv_proj.weight"] = pack(np.concatenate([q, k, v], axis=0))
        p[f"layers.{i}.self_attn.o_proj.weight"] = pack(hf[L + "self_attn.o_proj.weight"])
        gate, up = hf[L + "mlp.gate_proj.weight"], hf[L + "mlp.up_proj.weight"]
        p[f"layers.{i}.mlp.gate_up_proj.weight"] = pack(np.concatenate([gate, up], axis=0))
        p[f"layers.{i}.mlp.down_proj.weight"] = pack(hf[L + "mlp.down_proj.weight"])
        p[f"layers.{i}.input_layernorm.weight"] = hf[L + "input_layernorm.weight"]
        p[f"layers.{i}.post_attention_layernorm.weight"] = hf[L + "post_attention_layernorm.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in p.items()}
