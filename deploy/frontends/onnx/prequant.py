"""Models that arrive already quantized: lower them to float matmuls plus exact int8 weights.

TVM's ONNX importer runs `MatMulInteger` as an int32 matmul and QDQ graphs as fake-quant float
matmuls: no int8 speed. Here, at the ONNX level, before the import:

- ORT `quantize_dynamic` output, `DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, wzp)
  -> Cast -> Mul(x_scale * w_scale)`, becomes `MatMul(x, W)` with W = (Wq - wzp) * w_scale;
- QDQ weights, `DequantizeLinear(Wq, scale, zp)` on an initializer, become the float W;
- QDQ activation pairs `QuantizeLinear -> DequantizeLinear` are removed (the int8 module quantizes
  activations itself, per token).

The model is then an ordinary float graph for deploy/quantize/int8/scheme.py, and `exact` gives, per new
weight name, the model's own int8 values and per-column scales, which quantize.py uses as they are
instead of re-quantizing W (when they fit its symmetric [-127, 127] scheme with zero point 0).
"""

from __future__ import annotations

import numpy as np

QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}


def is_quantized(model) -> bool:
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


def lower(model):
    """Return (float model, {weight name: (int8 [K, N], fp32 scale [N])}, summary dict)."""
    import onnx
    from onnx import helper, numpy_helper

    if not is_quantized(model):
        return model, {}, None
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    exact: dict = {}
    new_inits = []
    replaced = set()  # ids of nodes to drop
    new_nodes = {}  # id(node) -> replacement node placed at the same position
    summary = {"matmul_integer": 0, "dequantized_weights": 0, "qdq_activations_removed": 0}

    def remember(name, q, zp, scale, n_cols):
        if q.dtype == np.int8 and (zp is None or not np.any(zp)) and q.min() >= -127:
            exact[name] = (q.astype(np.int8), np.broadcast_to(np.asarray(scale, np.float32), (n_cols,)).copy())

    for node in g.node:
        if node.op_type != "MatMulInteger":
            continue
        a, b = node.input[0], node.input[1]
        bq = arr(b)
        dq = producer.get(a)
        cons = consumers.get(node.output[0], [])
        if bq is None or bq.ndim != 2 or dq is None or dq.op_type != "DynamicQuantizeLinear" or len(cons) != 1 or cons[0].op_type != "Cast":
            continue
        cast = cons[0]
        muls = consumers.get(cast.output[0], [])
        if len(muls) != 1 or muls[0].op_type != "Mul":
            continue
        mul = muls[0]
        scale_in = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        smul = producer.get(scale_in)
        if smul is None or smul.op_type != "Mul" or dq.output[1] not in smul.input:
            continue
        w_scale = arr(smul.input[1] if smul.input[0] == dq.output[1] else smul.input[0])
        bzp = arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if w_scale is None:
            continue
        w = (bq.astype(np.float32) - (0 if bzp is None else bzp.astype(np.float32))) * w_scale.astype(np.float32)
        name = f"{b}_dequantized"
        new_inits.append(numpy_helper.from_array(w.astype(np.float32), name))
        remember(name, bq, bzp, w_scale, bq.shape[1])
        new_nodes[id(mul)] = helper.make_node("MatMul", [dq.input[0], name], [mul.output[0]], name=f"{node.name or b}_float")
        replaced.update({id(node), id(cast)})
        summary["matmul_integer"] += 1

    rename: dict[str, str] = {}
    for node in g.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = arr(node.input[0])
        if q is not None:
            scale = arr(node.input[1])
            zp = arr(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scale is None:
                continue
            axis = next((at.i for at in node.attribute if at.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim == 1 and q.ndim > 0:
                shape[axis % q.ndim] = -1
            w = (q.astype(np.float32) - (0 if zp is None else zp.reshape(shape).astype(np.float32))) * scale.reshape(shape).astype(np.float32)
            new_inits.append(numpy_helper.from_array(w.astype(np.float32), node.output[0]))
            if q.ndim == 2 and (scale.ndim == 0 or (axis % 2 == 1)):
                remember(node.output[0], q, zp, scale, q.shape[1])
            replaced.add(id(node))
            summary["dequantized_weights"] += 1
        else:
            qn = producer.get(node.input[0])
            if qn is not None and qn.op_type == "QuantizeLinear":
                rename[node.output[0]] = qn.input[0]
                replaced.add(id(node))
                summary["qdq_activations_removed"] += 1

    nodes = []
    for node in g.node:
        if id(node) in new_nodes:
            nodes.append(new_nodes[id(node)])
        elif id(node) not in replaced:
            nodes.append(node)
    for node in nodes:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    for out in g.output:
        if out.name in rename:
            # keep the graph output name: an Identity from the float tensor
            nodes.append(helper.make_node("Identity", [rename[out.name]], [out.name]))
    # Drop nodes nobody reads (the quantize/scale side chains), then unread initializers.
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    all_inits = list(g.initializer) + new_inits
    del g.initializer[:]
    g.initializer.extend(t for t in all_inits if t.name in needed)
    left = sorted({n.op_type for n in kept} & QUANT_OPS)
    summary["left_quantized_ops"] = left
    return model, exact, summary
