"""Small transformer graphs written with onnx.helper for the int8 tests and benchmark.

`transformer(path, ...)` writes a BERT-style encoder (output: last hidden state) or, with
`lm_head=True`, a decoder-style model whose logits come from the tied word embedding (output:
logits [batch, seq, vocab]). Weights are seeded random, or real ones passed in `weights` (see
`minilm_weights`; then pass token_types=True, position_ids=True). Sequence and batch dims are
symbolic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def transformer(path, *, vocab=96, hidden=64, heads=4, ffn=128, layers=2, lm_head=False, weights=None,
                seed=0, positions=512, token_types=False, position_ids=False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, shape, scale=0.08):
        arr = weights[name] if weights is not None else (rng.standard_normal(shape) * scale).astype(np.float32)
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def ones(name, n):
        arr = weights[name] if weights is not None else (1 + rng.standard_normal(n) * 0.05).astype(np.float32)
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs=None, **kw):
        out = outs or [f"{op.lower()}_{len(nodes)}"]
        nodes.append(helper.make_node(op, ins, out, **kw))
        return out[0]

    dh = hidden // heads
    const("shape_heads", np.array([0, 0, heads, dh], dtype=np.int64))
    const("shape_hidden", np.array([0, 0, hidden], dtype=np.int64))
    const("axes_12", np.array([1, 2], dtype=np.int64))
    const("one_f", np.array(1.0, dtype=np.float32))
    const("neg_big", np.array(-10000.0, dtype=np.float32))
    const("scale_qk", np.array(1.0 / np.sqrt(dh), dtype=np.float32))
    const("half", np.array(0.5, dtype=np.float32))
    const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32))

    emb = node("Gather", [w("embeddings.word_embeddings.weight", (vocab, hidden), 0.5), "input_ids"])
    if position_ids:
        emb = node("Add", [emb, node("Gather", [w("embeddings.position_embeddings.weight", (positions, hidden), 0.5), "position_ids"])])
    if token_types:
        tt = node("Gather", [w("embeddings.token_type_embeddings.weight", (2, hidden), 0.5), "token_type_ids"])
        emb = node("Add", [emb, tt])
    h = node("LayerNormalization", [emb, ones("embeddings.LayerNorm.weight", hidden), w("embeddings.LayerNorm.bias", (hidden,), 0.02)], axis=-1, epsilon=1e-12)
    maskf = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    maskf = node("Mul", [node("Sub", ["one_f", maskf]), "neg_big"])
    maskf = node("Unsqueeze", [maskf, "axes_12"])
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def dense(x, name, n_in, n_out):
            return node("Add", [node("MatMul", [x, w(p + name + ".weight", (n_in, n_out))]), w(p + name + ".bias", (n_out,), 0.02)])

        def split_heads(x):
            return node("Transpose", [node("Reshape", [x, "shape_heads"])], perm=[0, 2, 1, 3])

        q = split_heads(dense(h, "attention.self.query", hidden, hidden))
        k = node("Transpose", [node("Reshape", [dense(h, "attention.self.key", hidden, hidden), "shape_heads"])], perm=[0, 2, 3, 1])
        v = split_heads(dense(h, "attention.self.value", hidden, hidden))
        scores = node("Add", [node("Mul", [node("MatMul", [q, k]), "scale_qk"]), maskf])
        ctx = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), "shape_hidden"])
        attn = dense(ctx, "attention.output.dense", hidden, hidden)
        h = node("LayerNormalization", [node("Add", [attn, h]), ones(p + "attention.output.LayerNorm.weight", hidden),
                                        w(p + "attention.output.LayerNorm.bias", (hidden,), 0.02)], axis=-1, epsilon=1e-12)
        f = dense(h, "intermediate.dense", hidden, ffn)
        f = node("Mul", [node("Mul", [f, "half"]), node("Add", [node("Erf", [node("Mul", [f, "inv_sqrt2"])]), "one_f"])])
        f = dense(f, "output.dense", ffn, hidden)
        h = node("LayerNormalization", [node("Add", [f, h]), ones(p + "output.LayerNorm.weight", hidden),
                                        w(p + "output.LayerNorm.bias", (hidden,), 0.02)], axis=-1, epsilon=1e-12)
    if lm_head:
        wt = node("Transpose", ["embeddings.word_embeddings.weight"], perm=[1, 0])
        out = node("MatMul", [h, wt], ["logits"])
        out_info = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", vocab])
    else:
        out = node("Identity", [h], ["last_hidden_state"])
        out_info = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", hidden])
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
              + (["position_ids"] if position_ids else [])]
    graph = helper.make_graph(nodes, "transformer", inputs, [out_info], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def minilm_weights(safetensors_path) -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2 weights, renamed and transposed into `transformer`'s names and [in, out] layout."""
    from safetensors.numpy import load_file

    raw = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in load_file(str(safetensors_path)).items()}
    out = {}
    for k, v in raw.items():
        if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k:
            v = v.T
        out[k] = np.ascontiguousarray(v.astype(np.float32))
    return out
