"""Graph normalization before the Relax import: put exporter output into the form our importer
(TVM's frontend plus deploy/frontends/onnx/converters.py) handles.

- Model-local functions (the dynamo exporter can emit them) are inlined with onnx's inliner.
- Symbolic input dims are unified: language-model inputs are all [batch, seq]; exporters that
  were given `dynamic_axes` as lists, or none, name the same dim differently per input
  (`input_ids_dynamic_axes_1`, `unk__0`, ...). The frontend makes one symbolic var per name, and
  vars with different names can't be proved equal, so shapes are lost at the first broadcast.
  When every graph input is a rank-2 integer tensor with dynamic dims, dim 0 becomes `batch`
  and dim 1 `seq` on all of them.
"""

from __future__ import annotations

INT_TYPES = {6, 7, 12, 13}  # onnx TensorProto INT32, INT64, UINT32, UINT64


def graph_inputs(model) -> list:
    """Graph inputs that are fed at run time (not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def normalize(model):
    """Return the normalized model (the argument may be modified in place)."""
    import onnx.inliner

    if len(model.functions):
        model = onnx.inliner.inline_local_functions(model)
    unify_sequence_dims(model)
    return model


def unify_sequence_dims(model) -> bool:
    """Name dims 0/1 of [batch, seq] integer inputs `batch`/`seq` when they are dynamic and named
    inconsistently. Returns whether anything changed."""
    inputs = graph_inputs(model)
    if not inputs:
        return False
    dims = []
    for i in inputs:
        t = i.type.tensor_type
        if t.elem_type not in INT_TYPES or not t.HasField("shape") or len(t.shape.dim) != 2:
            return False
        dims.append(t.shape.dim)
    changed = False
    for axis, name in ((0, "batch"), (1, "seq")):
        column = [d[axis] for d in dims]
        if any(c.HasField("dim_value") for c in column):
            continue  # a static dim stays static
        names = {c.dim_param for c in column}
        if len(names) == 1 and "" not in names:
            continue  # already one shared name
        for c in column:
            c.dim_param = name
        changed = True
    return changed
