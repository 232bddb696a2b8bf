"""A plain numpy forward pass of the model definitions' math on a Hugging Face state dict (Llama /
Qwen2 / Mistral and GPT-2), for one sequence with full causal attention: the side of the
compile-time check that reads the weights the way our model will (verify.py)."""

from __future__ import annotations

import numpy as np


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attention(q, k, v, scale: float):
    """q [heads, T, d], k/v [kv heads, T, d] -> [T, heads * d], causal."""
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    t = q.shape[1]
    s = q @ k.transpose(0, 2, 1) * scale + np.triu(np.full((t, t), -np.inf, np.float32), 1)
    return (_softmax(s) @ v).transpose(1, 0, 2).reshape(t, -1)


def llama_logits(cfg, w: dict, ids: list[int], inv_freq: np.ndarray) -> np.ndarray:
    """[len(ids), vocab]: RMSNorm, RoPE (rotate-half, `inv_freq`), grouped-query attention with
    optional q/k/v biases, SwiGLU; the head tied to the embedding unless lm_head.weight is given."""
    d, hq, hkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    t = len(ids)
    ang = np.arange(t, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # [heads, T, d]
        rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    def proj(x, name, heads):
        y = x @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        return y.reshape(t, heads, d).transpose(1, 0, 2)

    h = w["model.embed_tokens.weight"][ids].astype(np.float32)
    for i in range(cfg.num_hidden_layers):
        L = f"model.layers.{i}."
        x = rms(h, w[L + "input_layernorm.weight"])
        q, k, v = (proj(x, L + f"self_attn.{n}_proj", heads) for n, heads in (("q", hq), ("k", hkv), ("v", hkv)))
        h = h + _attention(rope(q), rope(k), v, 1.0 / np.sqrt(d)) @ w[L + "self_attn.o_proj.weight"].T
        x = rms(h, w[L + "post_attention_layernorm.weight"])
        gate, up = x @ w[L + "mlp.gate_proj.weight"].T, x @ w[L + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[L + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return rms(h, w["model.norm.weight"]) @ head.T


def gpt2_logits(cfg, w: dict, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab]: learned positions, LayerNorm, fused q/k/v (Conv1D [in, out]), GELU."""
    T = "transformer."
    d, heads, t = cfg.head_dim, cfg.num_attention_heads, len(ids)

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):
        if cfg.activation == "gelu":
            from math import erf, sqrt

            return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    h = w[T + "wte.weight"][ids] + w[T + "wpe.weight"][np.arange(t)]
    for i in range(cfg.num_hidden_layers):
        L = f"{T}h.{i}."
        q, k, v = np.split(conv1d(ln(h, L + "ln_1"), L + "attn.c_attn"), 3, -1)
        q, k, v = (a.reshape(t, heads, d).transpose(1, 0, 2) for a in (q, k, v))
        scale = 1.0 / np.sqrt(d) if cfg.scale_attn_weights else 1.0
        h = h + conv1d(_attention(q, k, v, scale), L + "attn.c_proj")
        h = h + conv1d(gelu(conv1d(ln(h, L + "ln_2"), L + "mlp.c_fc")), L + "mlp.c_proj")
    head = w.get("lm_head.weight", w[T + "wte.weight"])
    return ln(h, T + "ln_f") @ head.T
