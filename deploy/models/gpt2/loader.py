"""GPT-2 weights from a Hugging Face checkpoint (GPT2LMHeadModel) or a GGUF file (general.architecture
gpt2, as llama.cpp's converter writes it) onto the model definition (model.py).

Both meet in one state dict: the names of transformers' GPT2LMHeadModel.state_dict()
("transformer.h.0.attn.c_attn.weight", ..., "lm_head.weight" when untied) in its layout, so the
Conv1D matrices (c_attn, c_proj, c_fc) are [in, out]. The one exception: a matrix kept quantized
from GGUF is a QWeight, whose layout is always [out, in]. `params(state_dict, cfg)` maps that dict
onto the model's parameters; any other source (an ONNX export of GPT2LMHeadModel) can use it too.
"""

from __future__ import annotations

import numpy as np

from edge.errors import ModelError

from deploy.frontends.gguf.reader import GGUFFile
from deploy.models.gpt2.model import GPT2Config
from deploy.models.llama.loader import _linear_params
from deploy.quantize.weight_only.layout import QWeight, storage_of

T = "transformer."
# config.json activation_function -> the model's activation (gelu_new, gelu_fast and
# gelu_pytorch_tanh are all GELU's tanh approximation; "gelu" is the exact erf form)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CONV1D_WEIGHTS = tuple(c + ".weight" for c in CONV1D)
# GGUF block tensor (blk.N.<name>.weight/.bias) -> state-dict module (transformer.h.N.<module>)
GGUF_NAMES = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
              "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def config_from_hf(config: dict, source: str = "config.json") -> GPT2Config:
    """A GPT2LMHeadModel config.json -> GPT2Config; what the definition does not implement is
    refused in one line."""

    def req(k):
        if k not in config:
            raise ModelError(f"{source}: no '{k}'")
        return config[k]

    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ModelError(f"{source}: activation_function '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if config.get(flag):
            raise ModelError(f"{source}: {flag}=true is not supported for GPT-2")
    hidden, heads = int(req("n_embd")), int(req("n_head"))
    if hidden % heads:
        raise ModelError(f"{source}: n_embd {hidden} is not a multiple of n_head {heads}")
    positions = config.get("n_positions", config.get("n_ctx"))
    if positions is None:
        raise ModelError(f"{source}: no 'n_positions'")
    return GPT2Config(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=int(req("n_layer")),
        vocab_size=int(req("vocab_size")),
        context_window_size=int(positions),
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation=ACTIVATIONS[act],
        scale_attn_weights=bool(config.get("scale_attn_weights", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def config_from_gguf(f: GGUFFile) -> GPT2Config:
    """GGUF gpt2 metadata (llama.cpp's converter: block_count, context_length, embedding_length,
    feed_forward_length, attention.head_count, attention.layer_norm_epsilon); the vocabulary is the
    token embedding's rows; the head is tied unless the file has output.weight."""
    req = lambda k: f.require(f"gpt2.{k}")  # noqa: E731
    hidden, heads = int(req("embedding_length")), int(req("attention.head_count"))
    if hidden % heads:
        raise ModelError(f"{f.path.name}: embedding_length {hidden} is not a multiple of attention.head_count {heads}")
    if not f.has("token_embd.weight"):
        raise ModelError(f"{f.path.name}: missing tensor token_embd.weight")
    return GPT2Config(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=int(req("block_count")),
        vocab_size=int(f.tensors["token_embd.weight"].shape[-1]),
        context_window_size=int(req("context_length")),
        intermediate_size=int(f.get("gpt2.feed_forward_length", 4 * hidden)),
        layer_norm_eps=float(f.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=not f.has("output.weight"),
    )


def shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the state dict and its shape (Conv1D matrices [in, out])."""
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    want = {T + "wte.weight": (cfg.vocab_size, h), T + "wpe.weight": (cfg.context_window_size, h),
            T + "ln_f.weight": (h,), T + "ln_f.bias": (h,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        L = f"{T}h.{i}."
        want |= {L + "ln_1.weight": (h,), L + "ln_1.bias": (h,), L + "ln_2.weight": (h,), L + "ln_2.bias": (h,),
                 L + "attn.c_attn.weight": (h, 3 * h), L + "attn.c_attn.bias": (3 * h,),
                 L + "attn.c_proj.weight": (h, h), L + "attn.c_proj.bias": (h,),
                 L + "mlp.c_fc.weight": (h, ffn), L + "mlp.c_fc.bias": (ffn,),
                 L + "mlp.c_proj.weight": (ffn, h), L + "mlp.c_proj.bias": (h,)}
    return want


def weights_from_hf(ckpt, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, shapes checked against config.json. transformers saves them as
    transformer.*; the original GPT-2 checkpoints have no prefix (and causal-mask buffers, unused)."""
    prefix = T if ckpt.has(T + "wte.weight") else ""
    out = {}
    for name, shape in shapes(cfg).items():
        stored = name if name == "lm_head.weight" else prefix + name.removeprefix(T)
        ckpt.check_shape(stored, shape)
        out[name] = ckpt.tensor(stored)
    return out


def weights_from_gguf(f: GGUFFile, cfg: GPT2Config, *, quantized: bool = False) -> dict:
    """The file's tensors as the state dict. llama.cpp's converter transposes the Conv1D matrices
    to [out, in] (ggml's layout); they are transposed back. With `quantized`, the head (the token
    embedding when tied) and the Conv1D matrices stored quantized stay so, as QWeight [out, in]
    (deploy/quantize/weight_only); the rest is read as fp32."""
    for name, shape in shapes(cfg).items():  # checked before reading: numpy order, Conv1D as the file holds it
        g = _gguf_name(name)
        want = shape[::-1] if name.endswith(CONV1D_WEIGHTS) else shape
        got = tuple(int(d) for d in reversed(f.tensors[g].shape)) if f.has(g) else None
        if got is None:
            raise ModelError(f"{f.path.name}: missing tensor {g}")
        if got != want:
            raise ModelError(f"{f.path.name}: tensor {g} has shape {list(got)}, but the metadata implies {list(want)}")
    linear = f.matrix if quantized else f.tensor  # [out, in]

    out = {T + "wte.weight": (linear if cfg.tie_word_embeddings else f.tensor)("token_embd.weight"),
           T + "wpe.weight": f.tensor("position_embd.weight"),
           T + "ln_f.weight": f.tensor("output_norm.weight"), T + "ln_f.bias": f.tensor("output_norm.bias")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = linear("output.weight")
    for i in range(cfg.num_hidden_layers):
        for g, h in GGUF_NAMES.items():
            L = f"{T}h.{i}.{h}."
            out[L + "weight"] = _swap(linear(f"blk.{i}.{g}.weight")) if h in CONV1D else f.tensor(f"blk.{i}.{g}.weight")
            out[L + "bias"] = f.tensor(f"blk.{i}.{g}.bias")
    if quantized:
        plan_quantization(out, cfg)
    return out


def _gguf_name(name: str) -> str:
    """A state-dict name -> the GGUF tensor that holds it."""
    top = {T + "wte.weight": "token_embd.weight", T + "wpe.weight": "position_embd.weight", T + "ln_f.weight":
           "output_norm.weight", T + "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    i, rest = name.removeprefix(T + "h.").split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{next(g for g, h in GGUF_NAMES.items() if h == part)}.{kind}"


def _swap(w):
    """Conv1D [in, out] <-> [out, in] for numpy arrays; a QWeight is always [out, in] and stays."""
    return w if isinstance(w, QWeight) else w.T


def linear_weights(cfg: GPT2Config) -> dict[str, list[tuple[str, bool]]]:
    """Each linear layer of the model -> its state-dict matrix (a one-element list, as Llama's fused
    parts) and whether the state dict stores it transposed ([in, out]: the Conv1D matrices)."""
    out = {"lm_head": [(T + "wte.weight" if cfg.tie_word_embeddings else "lm_head.weight", False)]}
    for i in range(cfg.num_hidden_layers):
        for c in CONV1D:
            out[f"h.{i}.{c}"] = [(f"{T}h.{i}.{c}.weight", True)]
    return out


def _linears(sd: dict, cfg: GPT2Config) -> dict[str, list]:
    """Each linear layer of the model -> its matrix [out, in]."""
    return {layer: [_swap(sd[n]) if transposed else sd[n] for n, transposed in parts]
            for layer, parts in linear_weights(cfg).items()}


def plan_quantization(sd: dict, cfg: GPT2Config) -> dict[str, int]:
    """Set cfg.quant: a linear layer whose matrix came quantized keeps its 4 or 8 bits, one that
    came fp16 stays fp16 (deploy/quantize/weight_only/layout.storage_of)."""
    cfg.quant = {name: bits for name, parts in _linears(sd, cfg).items() if (bits := storage_of(parts))}
    return cfg.quant


def params(sd: dict, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """The state dict (module docstring) -> the model's parameters, by the names export_tvm gives
    them; quantized layers as cfg.quant says (plan_quantization), every other matrix packed fp32.
    `lm_head.weight` is read only when the config is untied."""
    p = {}
    for name, parts in _linears(sd, cfg).items():
        p.update(_linear_params(name, parts, cfg))
    f32 = lambda name: np.asarray(sd[name], dtype=np.float32)  # noqa: E731
    if not cfg.tie_word_embeddings:
        p["wte"] = f32(T + "wte.weight")
    p["wpe"] = f32(T + "wpe.weight")
    p["ln_f.weight"], p["ln_f.bias"] = f32(T + "ln_f.weight"), f32(T + "ln_f.bias")
    for i in range(cfg.num_hidden_layers):
        L = f"h.{i}."
        for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias") + tuple(c + ".bias" for c in CONV1D):
            p[L + n] = f32(T + L + n)
    return {k: np.ascontiguousarray(v) for k, v in p.items()}
