"""The weights of an exported decoder graph, named by what they do: every linear layer (MatMul /
Gemm on a constant matrix, with the bias Add after it), every normalization (RMSNorm written out as
Pow/ReduceMean/Sqrt/Mul, LayerNormalization) and the embeddings (Gather on a constant table) are
found from the graph's structure alone, because exporters keep Hugging Face names only for some
tensors (torch.onnx's TorchScript exporter names the transposed matrices onnx::MatMul_N, the dynamo
exporter val_N). Roles come from the data flow:

  per layer, Llama / Qwen2 / Mistral: norm -> {q, k, v} (three linears reading one tensor; q and k
  meet as the two sides of the score MatMul, v is the right side of the other one) -> o -> norm ->
  {gate, up} (gate feeds the Sigmoid of SiLU) -> down;  GPT-2: ln_1 -> c_attn (fused q/k/v) ->
  c_proj -> ln_2 -> c_fc -> c_proj;  then the final norm and the head.

The result is the model's Hugging Face state dict (names and layout as transformers saves them)
plus a config.json synthesized from the shapes, which deploy/models/<arch> read as they read a
checkpoint directory."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from edge.errors import ModelError

from deploy.frontends.onnx.decoder.graph import Graph

SILU_GATES = ("Sigmoid", "Swish")


@dataclasses.dataclass
class Linear:
    node: object
    x: str  # the input activation (canonical: reshapes walked back)
    out: str  # the output (after the bias Add when there is one)
    weight: np.ndarray  # [out, in], as torch.nn.Linear stores it
    bias: np.ndarray | None
    name: str  # the weight's tensor name, for messages

    @property
    def shape(self):
        return tuple(self.weight.shape)


@dataclasses.dataclass
class Norm:
    kind: str  # "rms" or "layer"
    weight: np.ndarray
    bias: np.ndarray | None
    eps: float | None


def find_linears(g: Graph) -> list[Linear]:
    out = []
    for n in g.nodes:
        if n.op_type == "MatMul" and not g.is_const(n.input[0]):
            w = g.const(n.input[1])
            if w is None or w.ndim != 2:
                continue
            weight, bias, y = w.T, None, n.output[0]
            users = g.consumers.get(y, [])
            if len(users) == 1 and users[0][0].op_type == "Add":
                add = users[0][0]
                b = g.const(add.input[1 - users[0][1]])
                if b is not None and b.shape == (w.shape[1],):
                    bias, y = b, add.output[0]
        elif n.op_type == "Gemm" and not g.is_const(n.input[0]):
            w = g.const(n.input[1])
            if w is None or g.attr(n, "transA", 0) or g.attr(n, "alpha", 1.0) != 1.0 or g.attr(n, "beta", 1.0) != 1.0:
                continue
            weight = w if g.attr(n, "transB", 0) else w.T
            bias = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            y = n.output[0]
        else:
            continue
        if bias is not None:
            bias = np.broadcast_to(bias, (weight.shape[0],))
        out.append(Linear(n, g.source(n.input[0]), y, np.asarray(weight, dtype=np.float32),
                          None if bias is None else np.asarray(bias, dtype=np.float32), n.input[1]))
    return out


def find_norm(g: Graph, tensor: str, what: str) -> Norm:
    """The normalization whose output `tensor` is (walked back through reshapes and casts)."""
    n = g.producer.get(g.source(tensor))
    if n is not None and n.op_type == "LayerNormalization":
        return Norm("layer", _vec(g, n.input[1]), _vec(g, n.input[2]) if len(n.input) > 2 and n.input[2] else None,
                    float(f"{g.attr(n, 'epsilon', 1e-5):.7g}"))
    if n is not None and n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        return Norm("rms", _vec(g, n.input[1]), None, float(f"{g.attr(n, 'epsilon', 1e-5):.7g}"))
    bias = None
    if n is not None and n.op_type == "Add":  # LayerNorm written out: (x - mean) / std * w + b
        b = [i for i in n.input if g.is_const(i)]
        if len(b) == 1:
            bias = _vec(g, b[0])
            n = g.producer.get(g.source(next(i for i in n.input if not g.is_const(i))))
    if n is not None and n.op_type == "Mul":
        w = [i for i in n.input if g.is_const(i) and g.const(i).size > 1]
        rest = [i for i in n.input if not g.is_const(i)]
        if len(w) == 1 and len(rest) == 1:
            kind = "layer" if bias is not None or _upstream(g, rest[0], "Sub") else "rms"
            return Norm(kind, _vec(g, w[0]), bias, _eps(g, rest[0]))
    raise ModelError(f"{g.name}: cannot find the normalization before {what} (node {n.name if n is not None else tensor!r})")


def _vec(g: Graph, name: str) -> np.ndarray:
    return np.asarray(g.const(name), dtype=np.float32).reshape(-1)


def _walk_back(g: Graph, tensor: str, limit: int = 16):
    seen, todo = set(), deque([tensor])
    while todo and len(seen) < limit:
        n = g.producer.get(todo.popleft())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        todo.extend(i for i in n.input if i and not g.is_const(i))


def _upstream(g: Graph, tensor: str, op: str) -> bool:
    return any(n.op_type == op for n in _walk_back(g, tensor, 6))


def _eps(g: Graph, tensor: str) -> float | None:
    """The epsilon added to the mean square (variance) inside a written-out norm."""
    for n in _walk_back(g, tensor):
        if n.op_type == "Add":
            consts = [g.const(i) for i in n.input if g.is_const(i)]
            others = [g.producer.get(i) for i in n.input if not g.is_const(i)]
            if len(consts) == 1 and consts[0].size == 1 and any(o is not None and o.op_type == "ReduceMean" for o in others):
                return float(f"{float(consts[0].reshape(-1)[0]):.7g}")  # the config's value, not its float32 rounding
    return None


def embedding(g: Graph, input_name: str) -> np.ndarray | None:
    """The table a Gather reads with the graph input `input_name` as indices."""
    for n in g.nodes:
        if n.op_type == "Gather" and g.reaches_input(n.input[1]) == input_name:
            t = g.const(n.input[0])
            if t is not None and t.ndim == 2:
                return np.asarray(t, dtype=np.float32)
    return None


def _forward_hits(g: Graph, lin: Linear, linear_nodes: set) -> set:
    """(node id, input slot) of the first activation x activation MatMuls the linear's output reaches
    (shape computations are not followed)."""
    hits, seen, todo = set(), set(), deque([lin.out])
    while todo:
        t = todo.popleft()
        for n, slot in g.consumers.get(t, []):
            if n.op_type == "MatMul" and id(n) not in linear_nodes:
                hits.add((id(n), slot))
            elif n.op_type != "Shape" and id(n) not in linear_nodes and id(n) not in seen:
                seen.add(id(n))
                todo.extend(n.output)
    return hits


def _feeds(g: Graph, lin: Linear, ops: tuple) -> bool:
    return any(n.op_type in ops for n, _ in g.consumers.get(lin.out, []))


def groups(linears: list[Linear]) -> list[list[Linear]]:
    """Linears reading the same tensor, in graph order."""
    by_x: dict[str, list[Linear]] = {}
    for lin in linears:
        by_x.setdefault(lin.x, []).append(lin)
    return list(by_x.values())


@dataclasses.dataclass
class Mapped:
    family: str  # "llama" (Llama / Qwen2 / Mistral) or "gpt2"
    state: dict  # Hugging Face names -> arrays in transformers' layout
    config: dict  # a config.json in transformers' keys, from the graph alone
    facts: dict  # what was found, for the log and the manifest


def map_graph(g: Graph) -> Mapped:
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            raise ModelError(f"{g.name}: operator {n.domain}.{n.op_type} at node '{n.name}' (an ONNX Runtime-optimized or "
                             "quantized graph) is not read: export the model with torch.onnx or optimum without optimization")
        if n.op_type in ("If", "Loop", "Scan"):
            raise ModelError(f"{g.name}: control flow ({n.op_type} at node '{n.name}', e.g. optimum's merged decoder) is not "
                             "read: use the decoder with past key values on its own (model.onnx / decoder_with_past_model.onnx)")
    layers, kv_heads, head_size = g.check_signature()
    linears = find_linears(g)
    gs = groups(linears)
    sizes = [len(x) for x in gs]
    if sizes == [3, 1, 2, 1] * layers + [1]:
        return _llama(g, gs, layers, kv_heads, head_size, set(id(lin.node) for lin in linears))
    if sizes == [1, 1, 1, 1] * layers + [1] and gs[0][0].shape[0] == 3 * gs[0][0].shape[1]:
        return _gpt2(g, gs, layers, kv_heads, head_size)
    raise ModelError(f"{g.name}: the graph's {len(linears)} linear layers do not form a Llama / Qwen2 / Mistral or GPT-2 "
                     f"decoder of {layers} layers (linears per input, in order: {sizes[:9]}{' ...' if len(sizes) > 9 else ''})")


def _rope_inv_freq(g: Graph, half: int) -> np.ndarray | None:
    """RoPE's inverse frequencies, a constant of head_size / 2 values from 1 down (the exporters keep
    the rotary module's inv_freq buffer as it is)."""
    small = [name for name, t in g.initializers.items() if int(np.prod(t.dims)) == half]
    for name in small + [n.output[0] for n in g.nodes if n.op_type == "Constant"]:
        v = g.const(name)
        if v is None or v.size != half or v.dtype.kind != "f" or half < 2:
            continue
        v = v.reshape(-1).astype(np.float32)
        if abs(v[0] - 1.0) < 1e-6 and np.all(np.diff(v) < 0) and v[-1] > 0:
            return v
    return None


def _llama(g: Graph, gs, layers, kv_heads, head_size, linear_nodes) -> Mapped:
    state: dict[str, np.ndarray] = {}
    eps = None
    biased = False
    for i in range(layers):
        attn, (o,), mlp, (down,) = gs[4 * i: 4 * i + 4]
        L = f"model.layers.{i}."
        hits = {id(lin.node): _forward_hits(g, lin, linear_nodes) for lin in attn}
        q = [lin for lin in attn if any(s == 0 for _, s in hits[id(lin.node)])]
        if len(q) != 1:
            raise ModelError(f"{g.name}: layer {i}: cannot tell the query projection among {', '.join(x.name for x in attn)} "
                             "(no single one feeds the left side of the attention-score MatMul)")
        q = q[0]
        scores = {m for m, s in hits[id(q.node)] if s == 0}
        k = [lin for lin in attn if lin is not q and any(m in scores and s == 1 for m, s in hits[id(lin.node)])]
        if len(k) != 1:
            raise ModelError(f"{g.name}: layer {i}: cannot tell the key projection from the value projection")
        k = k[0]
        v = next(lin for lin in attn if lin is not q and lin is not k)
        gate = [lin for lin in mlp if _feeds(g, lin, SILU_GATES)]
        if len(gate) != 1:
            raise ModelError(f"{g.name}: layer {i}: cannot tell the MLP's gate from its up projection (no single one feeds a Sigmoid)")
        up = next(lin for lin in mlp if lin is not gate[0])
        for name, lin in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v), ("self_attn.o_proj", o),
                          ("mlp.gate_proj", gate[0]), ("mlp.up_proj", up), ("mlp.down_proj", down)):
            state[L + name + ".weight"] = lin.weight
            if lin.bias is not None:
                if name not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    raise ModelError(f"{g.name}: layer {i}: a bias on {name} is not supported (Llama / Qwen2 / Mistral have none)")
                state[L + name + ".bias"] = lin.bias
                biased = True
        for name, x in (("input_layernorm", attn[0].x), ("post_attention_layernorm", mlp[0].x)):
            norm = find_norm(g, x, f"layer {i}'s {'attention' if name == 'input_layernorm' else 'MLP'}")
            if norm.kind != "rms":
                raise ModelError(f"{g.name}: layer {i}: a LayerNorm where Llama / Qwen2 / Mistral have RMSNorm")
            state[L + name + ".weight"] = norm.weight
            eps = eps if eps is not None else norm.eps
    head = gs[-1][0]
    state["model.norm.weight"] = find_norm(g, head.x, "the head").weight
    embed = embedding(g, "input_ids")
    if embed is None:
        raise ModelError(f"{g.name}: no token embedding (a Gather on a constant table indexed by input_ids)")
    state["model.embed_tokens.weight"] = embed
    state["lm_head.weight"] = head.weight
    tied = head.weight.shape == embed.shape and np.array_equal(head.weight, embed)
    vocab, hidden = embed.shape
    if head_size is None or kv_heads is None:
        raise ModelError(f"{g.name}: past_key_values.0.key does not give the head count and size (dims 1 and 3 are symbolic); "
                         "put the model's config.json next to the graph")
    inv_freq = _rope_inv_freq(g, head_size // 2)
    heads = q.shape[0] // head_size
    config = {
        "architectures": ["Qwen2ForCausalLM" if biased else "LlamaForCausalLM"],
        "hidden_size": int(hidden), "intermediate_size": int(gate[0].shape[0]), "num_hidden_layers": layers,
        "num_attention_heads": int(heads), "num_key_value_heads": int(kv_heads), "head_dim": int(head_size),
        "vocab_size": int(vocab), "tie_word_embeddings": bool(tied), "hidden_act": "silu",
    }
    if eps is not None:
        config["rms_norm_eps"] = eps
    if inv_freq is not None and inv_freq.size > 1:
        config["rope_theta"] = float(inv_freq[1] ** (-head_size / 2.0))
    return Mapped("llama", state, config, {"inv_freq": inv_freq, "tied": tied, "biases": biased, "eps": eps})


def _gpt2(g: Graph, gs, layers, kv_heads, head_size) -> Mapped:
    T = "transformer."
    state: dict[str, np.ndarray] = {}
    eps = None
    for i in range(layers):
        (attn,), (proj,), (fc,), (down,) = gs[4 * i: 4 * i + 4]
        L = f"{T}h.{i}."
        for name, lin in (("attn.c_attn", attn), ("attn.c_proj", proj), ("mlp.c_fc", fc), ("mlp.c_proj", down)):
            state[L + name + ".weight"] = np.ascontiguousarray(lin.weight.T)  # Conv1D: [in, out]
            state[L + name + ".bias"] = lin.bias if lin.bias is not None else np.zeros(lin.shape[0], np.float32)
        for name, lin in (("ln_1", attn), ("ln_2", fc)):
            norm = find_norm(g, lin.x, f"layer {i}")
            if norm.kind != "layer":
                raise ModelError(f"{g.name}: layer {i}: an RMSNorm where GPT-2 has LayerNorm")
            state[L + name + ".weight"] = norm.weight
            state[L + name + ".bias"] = norm.bias if norm.bias is not None else np.zeros_like(norm.weight)
            eps = eps if eps is not None else norm.eps
    head = gs[-1][0]
    final = find_norm(g, head.x, "the head")
    state[T + "ln_f.weight"] = final.weight
    state[T + "ln_f.bias"] = final.bias if final.bias is not None else np.zeros_like(final.weight)
    wte = embedding(g, "input_ids")
    wpe = embedding(g, "position_ids")
    if wte is None or wpe is None:
        raise ModelError(f"{g.name}: no {'token' if wte is None else 'position'} embedding (a Gather on a constant table "
                         f"indexed by {'input_ids' if wte is None else 'position_ids'})")
    state[T + "wte.weight"], state[T + "wpe.weight"] = wte, wpe
    tied = head.weight.shape == wte.shape and np.array_equal(head.weight, wte)
    if not tied:
        state["lm_head.weight"] = head.weight
    hidden = wte.shape[1]
    heads = kv_heads or (hidden // head_size if head_size else None)
    if heads is None:
        raise ModelError(f"{g.name}: past_key_values.0.key does not give the head count (dim 1 is symbolic); "
                         "put the model's config.json next to the graph")
    gelu = "gelu" if any(n.op_type == "Erf" for n in g.nodes) else "gelu_new"
    config = {"architectures": ["GPT2LMHeadModel"], "n_embd": int(hidden), "n_head": int(heads), "n_layer": layers,
              "vocab_size": int(wte.shape[0]), "n_positions": int(wpe.shape[0]), "n_inner": int(gs[2][0].shape[0]),
              "activation_function": gelu, "tie_word_embeddings": bool(tied)}
    if eps is not None:
        config["layer_norm_epsilon"] = eps
    return Mapped("gpt2", state, config, {"tied": tied, "eps": eps})
