"""GPT-2 (as Hugging Face GPT2LMHeadModel and llama.cpp's gpt2 GGUF carry it): learned absolute
positions, LayerNorm with bias, GELU, fused q/k/v, biases on every linear layer, a tied (or untied)
head, over TVM's paged KV cache with no RoPE. Written in relax.frontend.nn.

The linear layers are Llama's PackedLinear (pre-packed [N / 16, K, 16], fp32 or weight-only 4/8-bit);
the position of every token comes from the KV cache (its query positions), so a decode step at
position p adds wpe[p]. Parameter names follow Hugging Face's (h.N.attn.c_attn, ...).
"""

from __future__ import annotations

import dataclasses

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from deploy.models.llama.model import PANEL, LlamaForCausalLM, PackedLinear, _take_rows, cached_attention

ACTIVATIONS = ("gelu_tanh", "gelu")  # GELU's tanh approximation (gelu_new: GPT-2's own) or erf


@dataclasses.dataclass
class GPT2Config:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    context_window_size: int  # n_positions: the rows of the position table; no context beyond it
    intermediate_size: int = 0  # n_inner (default 4 * hidden)
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    scale_attn_weights: bool = True  # scores scaled by 1 / sqrt(head_dim) (False: not scaled)
    tie_word_embeddings: bool = True
    # weight-only quantization per linear layer ("h.3.mlp.c_fc", "lm_head", ...): 4 or 8 bits
    quant: dict = dataclasses.field(default_factory=dict)
    head_dim: int = 0
    num_key_value_heads: int = 0  # = num_attention_heads (no grouped-query attention in GPT-2)
    kv_cache_dtype: str = "float32"  # or "float16" (edgejit compile --kv-cache fp16)
    rope_theta = 10000.0  # not a field: the shared KV cache constructor reads it; it applies no RoPE

    def __post_init__(self):
        if not self.intermediate_size:
            self.intermediate_size = 4 * self.hidden_size
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} (supported: {', '.join(ACTIVATIONS)})")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, prefix: str):
        self.cfg = cfg
        h = cfg.hidden_size
        self.c_attn = PackedLinear(h, 3 * h, bias=True, bits=cfg.quant.get(prefix + "c_attn"))
        self.c_proj = PackedLinear(h, h, bias=True, bits=cfg.quant.get(prefix + "c_proj"))

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        cfg = self.cfg
        d, heads = cfg.head_dim, cfg.num_attention_heads
        b, s, _ = x.shape
        qkv = op.reshape(self.c_attn(x), (b, s, 3 * heads, d))
        scale = d**-0.5 if cfg.scale_attn_weights else 1.0
        out = cached_attention(kv, layer_id, qkv, heads, scale, cfg.kv_cache_dtype)
        return self.c_proj(op.reshape(out, (b, s, heads * d)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config, prefix: str):
        self.activation = cfg.activation
        self.c_fc = PackedLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, bits=cfg.quant.get(prefix + "c_fc"))
        self.c_proj = PackedLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, bits=cfg.quant.get(prefix + "c_proj"))

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(op.gelu(self.c_fc(x), approximate="tanh" if self.activation == "gelu_tanh" else None))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, i: int):
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg, f"h.{i}.attn.")
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg, f"h.{i}.mlp.")

    def forward(self, x, kv, layer_id):
        x = x + self.attn(self.ln_1(x), kv, layer_id)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    # prefill / decode, the KV cache (TVM's paged cache with no RoPE inside: Llama rotates q/k itself,
    # GPT-2 has none) and the exported signatures are Llama's: the same runtime drives both.
    prefill = LlamaForCausalLM.prefill  # embed (_embed), blocks (_body), logits at the given rows
    decode = LlamaForCausalLM.decode
    create_kv_cache = LlamaForCausalLM.create_kv_cache
    get_default_spec = LlamaForCausalLM.get_default_spec

    def __init__(self, cfg: GPT2Config):
        self.cfg = cfg
        self.h = nn.ModuleList([GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.lm_head = PackedLinear(cfg.hidden_size, cfg.vocab_size, bits=cfg.quant.get("lm_head"))
        if not cfg.tie_word_embeddings:
            self.wte = nn.Parameter((cfg.vocab_size, cfg.hidden_size), "float32")
        self.wpe = nn.Parameter((cfg.context_window_size, cfg.hidden_size), "float32")

    def _embed(self, ids: Tensor) -> Tensor:
        if not self.cfg.tie_word_embeddings:
            return _take_rows(self.wte, ids)
        wp = self.lm_head.packed()  # rows of the tied head, gathered from its packed form (as Llama's)
        return _take_rows(op.reshape(op.permute_dims(wp, [0, 2, 1]), (wp.shape[0] * PANEL, wp.shape[1])), ids)

    def _body(self, x: Tensor, kv: PagedKVCache, total: int) -> Tensor:
        """x [B, S, H] (B * S = total tokens) plus each token's position embedding, through the blocks."""
        x = x + op.reshape(_take_rows(self.wpe, kv.get_query_positions(total)), x.shape)
        for i, block in enumerate(self.h):
            x = block(x, kv, i)
        return self.ln_f(x)
