"""Llama weights from a GGUF file or a Hugging Face checkpoint onto the model definition (model.py)."""

from __future__ import annotations

import math

import numpy as np

from edge.errors import ModelError

from deploy.frontends.gguf.reader import GGUFFile
from deploy.quantize.weight_only.layout import F16, Q8S, QWeight, code_bits, concat_rows, storage_of
from deploy.quantize.weight_only.layout import pack as pack_quant
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


def _hf_rope(config: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling parameters or None) from config.json: transformers 4 writes
    rope_theta / rope_scaling, transformers 5 rope_parameters."""
    rp = config.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or rp
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ModelError(f"{source}: RoPE scaling '{kind}' is not supported (supported: llama3)")
    return theta, scaling


def llama3_rope_factors(cfg: LlamaConfig, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of inv_freq for llama3 RoPE scaling: what llama.cpp's converter
    writes as rope_freqs.weight (transformers' _compute_llama3_parameters, as factors)."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    d = cfg.head_dim
    freqs = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    wavelen = np.float32(2 * math.pi) / freqs
    smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
    out = np.where(wavelen < old / high, np.float32(1.0),
                   np.where(wavelen > old / low, np.float32(factor), 1.0 / ((1.0 - smooth) / np.float32(factor) + smooth)))
    return out.astype(np.float32)


def config_from_hf(config: dict, source: str = "config.json", *, qkv_bias: bool = False) -> LlamaConfig:
    """A Llama-family config.json (LlamaForCausalLM, MistralForCausalLM; Qwen2ForCausalLM with
    qkv_bias) -> LlamaConfig. What the definition does not implement is refused in one line."""

    def req(k):
        if k not in config:
            raise ModelError(f"{source}: no '{k}'")
        return config[k]

    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"{source}: hidden_act '{act}' is not supported (supported: silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ModelError(f"{source}: {flag}=true is not supported for this architecture")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelError(f"{source}: partial rotary embeddings (partial_rotary_factor "
                         f"{config['partial_rotary_factor']}) are not supported")
    heads, hidden = int(req("num_attention_heads")), int(req("hidden_size"))
    theta, _ = _hf_rope(config, source)
    context = int(config.get("max_position_embeddings", 2048))
    # A sliding window applies when the config uses it: Mistral's sliding_window, Qwen2's with
    # use_sliding_window (transformers 5 lists the layers in layer_types).
    window = config.get("sliding_window")
    if "use_sliding_window" in config and not config["use_sliding_window"]:
        window = None
    if "layer_types" in config and "sliding_attention" not in (config["layer_types"] or []):
        window = None
    window = int(window) if window and int(window) < context else 0
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(req("intermediate_size")),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        num_hidden_layers=int(req("num_hidden_layers")),
        vocab_size=int(req("vocab_size")),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        head_dim=int(config.get("head_dim") or hidden // heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        context_window_size=min(context, window) if window else context,
        qkv_bias=qkv_bias,
        sliding_window=window,
    )


def weights_from_hf(ckpt, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (Hugging Face names and layout already), shapes checked against
    the config; llama3 RoPE scaling in config.json becomes the per-frequency factors."""
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    want = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        L = f"model.layers.{i}."
        want |= {L + "input_layernorm.weight": (h,), L + "post_attention_layernorm.weight": (h,),
                 L + "self_attn.q_proj.weight": (hq * d, h), L + "self_attn.k_proj.weight": (hkv * d, h),
                 L + "self_attn.v_proj.weight": (hkv * d, h), L + "self_attn.o_proj.weight": (h, hq * d),
                 L + "mlp.gate_proj.weight": (ffn, h), L + "mlp.up_proj.weight": (ffn, h),
                 L + "mlp.down_proj.weight": (h, ffn)}
        if cfg.qkv_bias:
            want |= {L + "self_attn.q_proj.bias": (hq * d,), L + "self_attn.k_proj.bias": (hkv * d,),
                     L + "self_attn.v_proj.bias": (hkv * d,)}
    out = {}
    for name, shape in want.items():
        ckpt.check_shape(name, shape)
        out[name] = ckpt.tensor(name)
    _, scaling = _hf_rope(ckpt.config, "config.json")
    if scaling is not None:
        out["rope_freqs"] = llama3_rope_factors(cfg, scaling)
    return out


def _unpermute(w, heads: int):
    """Undo llama.cpp's converter, which interleaves each head's Q/K rows for its RoPE layout
    (a row permutation: quantized rows move with their scales)."""
    rows = w.shape[0]
    idx = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
    return w.rows(idx) if isinstance(w, QWeight) else w[idx]


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


def weights_from_gguf(f: GGUFFile, cfg: LlamaConfig, *, permuted: bool = True, quantized: bool = False) -> dict:
    """The checkpoint in Hugging Face names and layout (Q/K rows un-permuted: llama.cpp permutes
    them for llama, not for qwen2); q/k/v biases when the config has them. With `quantized`, the
    matrices stored quantized stay so (QWeight: deploy/quantize/weight_only), else fp32."""
    matrix = (lambda name: f.matrix(name)) if quantized else f.tensor
    embed = matrix("token_embd.weight") if cfg.tie_word_embeddings else f.tensor("token_embd.weight")
    out = {"model.embed_tokens.weight": embed, "model.norm.weight": f.tensor("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = matrix("output.weight")
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            w = matrix(f"blk.{i}.{g}.weight") if g not in ("attn_norm", "ffn_norm") else f.tensor(f"blk.{i}.{g}.weight")
            if permuted and g == "attn_q":
                w = _unpermute(w, cfg.num_attention_heads)
            elif permuted and g == "attn_k":
                w = _unpermute(w, cfg.num_key_value_heads)
            out[f"model.layers.{i}.{h}.weight"] = w
            if cfg.qkv_bias and g in ("attn_q", "attn_k", "attn_v"):
                out[f"model.layers.{i}.{h}.bias"] = f.tensor(f"blk.{i}.{g}.bias")
    if f.has("rope_freqs.weight"):
        out["rope_freqs"] = f.tensor("rope_freqs.weight")
    if quantized:
        plan_quantization(out, cfg)
    return out


def linear_weights(cfg: LlamaConfig) -> dict[str, list[tuple[str, bool]]]:
    """Each linear layer of the model -> the checkpoint matrices fused into it, in row order, each
    with whether the checkpoint stores it transposed ([in, out]; never for Llama)."""
    out = {"lm_head": [("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", False)]}
    for i in range(cfg.num_hidden_layers):
        L = f"model.layers.{i}."
        out[f"layers.{i}.self_attn.qkv_proj"] = [(L + f"self_attn.{n}_proj.weight", False) for n in "qkv"]
        out[f"layers.{i}.self_attn.o_proj"] = [(L + "self_attn.o_proj.weight", False)]
        out[f"layers.{i}.mlp.gate_up_proj"] = [(L + "mlp.gate_proj.weight", False), (L + "mlp.up_proj.weight", False)]
        out[f"layers.{i}.mlp.down_proj"] = [(L + "mlp.down_proj.weight", False)]
    return out


def _linears(hf: dict, cfg: LlamaConfig) -> dict[str, list]:
    """Each linear layer of the model -> the checkpoint matrices fused into it, in row order."""
    return {layer: [hf[n] for n, _ in parts] for layer, parts in linear_weights(cfg).items()}


def plan_quantization(hf: dict, cfg: LlamaConfig) -> dict[str, int]:
    """Set cfg.quant from the weights: a linear layer whose matrices all came quantized keeps
    4 or 8 bits, one whose matrices all came fp16 stays fp16; any other mix makes the whole layer
    fp32 (deploy/quantize/weight_only/layout.storage_of)."""
    cfg.quant = {name: bits for name, parts in _linears(hf, cfg).items() if (bits := storage_of(parts))}
    return cfg.quant


def _linear_params(name: str, parts: list, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    if cfg.quant.get(name) == F16:
        return {f"{name}.weight": pack(np.concatenate(parts, axis=0))}
    if name in cfg.quant:
        q, s, z = pack_quant(concat_rows(parts).as_bits(code_bits(cfg.quant[name])))
        if cfg.quant[name] == Q8S:
            return {f"{name}.qweight": q, f"{name}.qscale": s}
        return {f"{name}.qweight": q, f"{name}.qscale": s, f"{name}.qzero": z}
    dense = [p.dequantize() if isinstance(p, QWeight) else p for p in parts]
    return {f"{name}.weight": pack(np.concatenate(dense, axis=0)).astype(np.float32)}


def params(hf: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> the model's parameters, by the names export_tvm gives them
    (quantized layers as cfg.quant says: plan_quantization)."""
    p = {}
    for name, parts in _linears(hf, cfg).items():
        p.update(_linear_params(name, parts, cfg))
    if not cfg.tie_word_embeddings:
        p["embed_tokens"] = np.ascontiguousarray(hf["model.embed_tokens.weight"], dtype=np.float32)
    p["norm.weight"] = np.asarray(hf["model.norm.weight"], dtype=np.float32)
    p["rope_inv_freq"] = rope_inv_freq(cfg, hf.get("rope_freqs"))
    for i in range(cfg.num_hidden_layers):
        L = f"model.layers.{i}."
        if cfg.qkv_bias:
            p[f"layers.{i}.self_attn.qkv_proj.bias"] = np.concatenate([hf[L + f"self_attn.{n}_proj.bias"] for n in "qkv"]).astype(np.float32)
        p[f"layers.{i}.input_layernorm.weight"] = np.asarray(hf[L + "input_layernorm.weight"], dtype=np.float32)
        p[f"layers.{i}.post_attention_layernorm.weight"] = np.asarray(hf[L + "post_attention_layernorm.weight"], dtype=np.float32)
    return {k: np.ascontiguousarray(v) for k, v in p.items()}
