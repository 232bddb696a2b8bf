"""Llama (as GGUF and Hugging Face carry it): RMSNorm, RoPE, SwiGLU, grouped-query attention,
tied or untied head, over TVM's paged KV cache. Written in relax.frontend.nn. With `qkv_bias`
it is also Qwen2's definition (deploy/models/qwen2).

Weights of every linear layer are stored pre-packed [N / 16, K, 16] (edge.kernels.dense), so
matmuls lower to our packed dense kernel. The token embedding of a tied model is read straight
out of the packed LM head (one copy of the largest tensor).
"""

from __future__ import annotations

import dataclasses

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from deploy.quantize.weight_only.layout import F16, Q8S

PANEL = 16
GROUP = 32  # inputs per quantization group


@dataclasses.dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int = 0
    tie_word_embeddings: bool = True
    context_window_size: int = 2048
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    # weight-only storage per linear layer ("layers.3.mlp.down_proj", "lm_head", ...): 4 or 8 bits,
    # Q8S (8-bit without zeros) or F16 (16: fp16 weights) (deploy/quantize/weight_only/layout); layers not named here keep fp32
    quant: dict = dataclasses.field(default_factory=dict)
    sliding_window: int = 0  # Mistral / Qwen2 configs: attention window (0: none); the context stays within it
    kv_cache_dtype: str = "float32"  # or "float16" (edgejit compile --kv-cache fp16)


    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads


def padded(n: int) -> int:
    return -(-n // PANEL) * PANEL


class PackedLinear(nn.Module):
    """y = x @ W with W [K, N] stored packed [ceil(N / 16), K, 16] (zero columns past N).

    Written as matmul(x, unpack(Wp)): the build (edge.kernels.packing.rewrite_packed_dense) turns
    it into the packed dense kernel after any shape specialization, so the unpacking never runs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int | None = None):
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        panels = padded(out_features) // PANEL
        if bits is None or bits == F16:  # fp16 weights are widened in the kernel (edge/kernels/dense.widen)
            self.weight = nn.Parameter((panels, in_features, PANEL), "float16" if bits == F16 else "float32")
        else:  # group-quantized codes, scale and zero per 32 inputs (deploy/quantize/weight_only; Q8S: no zero)
            codes = in_features // 2 if bits == 4 else in_features
            self.qweight = nn.Parameter((panels, codes, PANEL), "uint8" if bits == 4 else "int8")
            self.qscale = nn.Parameter((panels, in_features // GROUP, PANEL), "float16")
            if bits != Q8S:
                self.qzero = nn.Parameter((panels, in_features // GROUP, PANEL), "float16")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def packed(self) -> Tensor:
        """The float weight in the packed layout [N / 16, K, 16]: quantized codes are written as
        dequantized here and the build reads them in the kernel instead (never materialized)."""
        if self.bits is None:
            return self.weight
        from edge.kernels import dense

        if self.bits == F16:
            return op.tensor_expr_op(dense.widen, "widen_f16", [self.weight])
        if self.bits == Q8S:
            return op.tensor_expr_op(dense.dequant_sym, "dequant_q8s", [self.qweight, self.qscale])
        return op.tensor_expr_op(dense.dequant, f"dequant_q{self.bits}", [self.qweight, self.qscale, self.qzero])

    def forward(self, x: Tensor) -> Tensor:
        w = op.reshape(op.permute_dims(self.packed(), [1, 0, 2]), (self.in_features, padded(self.out_features)))
        y = op.matmul(x, w)
        if padded(self.out_features) != self.out_features:
            y = op.split(y, [self.out_features], axis=-1)[0]
        return y if self.bias is None else y + self.bias  # fused into the dense kernel's epilogue


def _relax(fn, x: Tensor) -> Tensor:
    return op.wrap_nested(fn(x._expr), name=fn.__name__)


def _take_rows(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx] with out-of-range indices clamped (the runtime checks them; this is the second guard)."""
    return op.wrap_nested(rx.op.take(table._expr, idx._expr, axis=0, mode="clip"), name="take")


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [T, 1, D] of each token's position times each frequency (HF's layout: the
    D / 2 frequencies twice), computed once per forward for every layer."""
    t, half = positions.shape[0], inv_freq.shape[0]
    freqs = op.reshape(positions.astype("float32"), (t, 1)) * op.reshape(inv_freq, (1, half))
    emb = op.reshape(op.concat([freqs, freqs], dim=-1), (t, 1, 2 * half))
    return _relax(rx.op.cos, emb), _relax(rx.op.sin, emb)


def apply_rope(qkv: Tensor, cos: Tensor, sin: Tensor, rotated_heads: int) -> Tensor:
    """Rotate-half RoPE on the first `rotated_heads` heads (q and k) of qkv [T, H, D]."""
    qk, v = op.split(qkv, [rotated_heads], axis=1)
    x1, x2 = op.split(qk, 2, axis=-1)
    qk = qk * cos + op.concat([op.negative(x2), x1], dim=-1) * sin
    return op.concat([qk, v], dim=1)


def cached_attention(kv: PagedKVCache, layer_id: int, qkv: Tensor, heads: int, sm_scale: float, dtype: str) -> Tensor:
    """Attention of qkv [B, S, H, D] over the cache, in the model's fp32. TVM's cache takes q, k, v
    and gives the output in its own dtype: an fp16 cache rounds them to fp16 on the way in (the
    kernels compute in fp32, edge/kernels/attention.py), as llama.cpp's F16 cache does."""
    if dtype == "float32":
        return kv.attention_with_fused_qkv(layer_id, qkv, heads, sm_scale=sm_scale)
    return kv.attention_with_fused_qkv(layer_id, qkv.astype(dtype), heads, sm_scale=sm_scale).astype("float32")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str):
        self.cfg = cfg
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_proj = PackedLinear(cfg.hidden_size, (hq + 2 * hkv) * d, bias=cfg.qkv_bias, bits=cfg.quant.get(prefix + "qkv_proj"))
        self.o_proj = PackedLinear(hq * d, cfg.hidden_size, bits=cfg.quant.get(prefix + "o_proj"))

    def forward(self, x: Tensor, kv: PagedKVCache, rope: tuple, layer_id: int) -> Tensor:
        cfg = self.cfg
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b * s, hq + 2 * hkv, d))
        qkv = op.reshape(apply_rope(qkv, *rope, hq + hkv), (b, s, hq + 2 * hkv, d))
        out = cached_attention(kv, layer_id, qkv, hq, d**-0.5, cfg.kv_cache_dtype)
        return self.o_proj(op.reshape(out, (b, s, hq * d)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str):
        self.ffn = cfg.intermediate_size
        self.gate_up_proj = PackedLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bits=cfg.quant.get(prefix + "gate_up_proj"))
        self.down_proj = PackedLinear(cfg.intermediate_size, cfg.hidden_size, bits=cfg.quant.get(prefix + "down_proj"))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, i: int):
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.self_attn = LlamaAttention(cfg, f"layers.{i}.self_attn.")
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.mlp = LlamaMLP(cfg, f"layers.{i}.mlp.")

    def forward(self, x, kv, rope, layer_id):
        x = x + self.self_attn(self.input_layernorm(x), kv, rope, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.layers = nn.ModuleList([LlamaLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.lm_head = PackedLinear(cfg.hidden_size, cfg.vocab_size, bits=cfg.quant.get("lm_head"))
        if not cfg.tie_word_embeddings:
            self.embed_tokens = nn.Parameter((cfg.vocab_size, cfg.hidden_size), "float32")
        self.rope_inv_freq = nn.Parameter((cfg.head_dim // 2,), "float32")

    def _embed(self, ids: Tensor) -> Tensor:
        if not self.cfg.tie_word_embeddings:
            return _take_rows(self.embed_tokens, ids)

        # Rows of W^T read from the packed head: fused into one gather, the table is not unpacked.
        wp = self.lm_head.packed()
        table = op.reshape(op.permute_dims(wp, [0, 2, 1]), (wp.shape[0] * PANEL, wp.shape[1]))
        return _take_rows(table, ids)

    def _body(self, x: Tensor, kv: PagedKVCache, total: int) -> Tensor:
        rope = rope_tables(kv.get_query_positions(total), self.rope_inv_freq)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv, rope, i)
        return self.norm(x)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, kv: PagedKVCache):
        """A chunk of tokens from one or more sequences back to back (ragged); logits at
        `logit_positions` (one per sequence: the index of its last token in the chunk)."""
        n = input_ids.shape[0]
        x = op.reshape(self._embed(input_ids), (1, n, self.cfg.hidden_size))
        h = self._body(x, kv, n)
        h = _take_rows(op.reshape(h, (n, self.cfg.hidden_size)), logit_positions)
        return self.lm_head(h), kv

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        """One new token for each sequence of the batch."""
        b = input_ids.shape[0]
        x = op.reshape(self._embed(input_ids), (b, 1, self.cfg.hidden_size))
        h = self._body(x, kv, b)
        return self.lm_head(op.reshape(h, (b, self.cfg.hidden_size))), kv

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                        page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
        from tvm.target import Target

        cfg = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]), num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=cfg.rope_theta, rope_scaling={},
            rope_ext_factors=rx.prim_value(0), rotary_dim=cfg.head_dim, enable_disaggregation=False,
            dtype=cfg.kv_cache_dtype, target=Target.current(),
        )

    def get_default_spec(self):
        kv = nn.spec.Object(object_type=PagedKVCache)
        packed = {"param_mode": "packed", "effect_mode": "none"}
        return nn.spec.ModuleSpec.from_raw({
            "prefill": {"input_ids": nn.spec.Tensor(["num_tokens"], "int32"),
                        "logit_positions": nn.spec.Tensor(["num_seqs"], "int32"), "kv": kv, "$": packed},
            "decode": {"input_ids": nn.spec.Tensor(["num_seqs"], "int32"), "kv": kv, "$": packed},
            "create_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                "page_size": int, "support_sliding_window": int,
                                "$": {"param_mode": "none", "effect_mode": "none"}},
        }, self)
