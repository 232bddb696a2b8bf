"""An exported decoder graph, indexed for reading its weights back: which node makes each tensor,
which nodes read it, the value of every constant tensor (initializers and Constant nodes, followed
through Identity, Cast and Transpose), and the decoder signature optimum and torch.onnx write
(input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits, present.N.key/value)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np

from edge.errors import ModelError

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
# ops that only move or re-type a tensor: walked through when looking for where a value comes from
PASS_THROUGH = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def past_inputs(model) -> list[str]:
    return [i.name for i in model.graph.input if PAST.match(i.name)]


def kind(path: str | Path) -> str:
    """"with_past" (a decoder with past key values), "without_past" (input_ids -> logits only) or
    "other", from the graph's signature alone (weights not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX: the compile driver says so in its own words
        return "other"
    names = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    if past_inputs(model):
        return "with_past"
    return "without_past" if "input_ids" in names and "logits" in outputs else "other"


def _dims(value_info) -> list:
    """Static dims as ints, symbolic ones as their names (or None)."""
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


class Graph:
    def __init__(self, model, path: Path):
        from onnx import numpy_helper

        self.model, self.path, self.name = model, Path(path), Path(path).name
        g = model.graph
        self._np = numpy_helper
        self.nodes = list(g.node)
        self.index = {id(n): k for k, n in enumerate(self.nodes)}
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = collections.defaultdict(list)
        for n in self.nodes:
            for slot, i in enumerate(n.input):
                if i:
                    self.consumers[i].append((n, slot))
        self.inputs = {i.name: i for i in g.input if i.name not in self.initializers}
        self.outputs = {o.name: o for o in g.output}
        self._const: dict[str, np.ndarray | None] = {}

    # -- values -----------------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, else None."""
        if name in self._const:
            return self._const[name]
        self._const[name] = None  # cycles cannot happen in a valid graph; this also stops a bad one
        v = None
        if name in self.initializers:
            v = self._np.to_array(self.initializers[name])
        elif (n := self.producer.get(name)) is not None:
            if n.op_type == "Constant":
                v = self._constant_node(n)
            elif n.op_type == "Identity":
                v = self.const(n.input[0])
            elif n.op_type == "Cast":
                x = self.const(n.input[0])
                if x is not None:
                    from onnx.helper import tensor_dtype_to_np_dtype

                    v = x.astype(tensor_dtype_to_np_dtype(self.attr(n, "to")))
            elif n.op_type == "Transpose":
                x = self.const(n.input[0])
                if x is not None:
                    v = np.transpose(x, self.attr(n, "perm", None))
        self._const[name] = v
        return v

    def _constant_node(self, n):
        from onnx import helper

        for a in n.attribute:
            if a.name == "value":
                return self._np.to_array(a.t)
            if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(a))
        return None

    @staticmethod
    def attr(node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def source(self, name: str) -> str:
        """The tensor `name` is a re-typed / re-shaped view of (walked back through PASS_THROUGH ops)."""
        while (n := self.producer.get(name)) is not None and n.op_type in PASS_THROUGH and not self.is_const(name):
            name = n.input[0]
        return name

    def reaches_input(self, name: str) -> str | None:
        """The graph input a tensor is a view of, if any."""
        name = self.source(name)
        return name if name in self.inputs else None

    # -- the decoder signature ------------------------------------------------------------------
    def check_signature(self) -> tuple[int, int | None, int | None]:
        """(layers, kv heads, head size) from past_key_values.N.key/value [batch, kv heads, past, head
        size] (heads and size None when the export left them symbolic). One-line error when the graph's
        inputs and outputs are not a decoder's with past key values."""
        names = list(self.inputs)
        want = "a decoder with past key values has inputs input_ids, attention_mask, position_ids, " \
               "past_key_values.N.key/value and outputs logits, present.N.key/value"
        if "input_ids" not in self.inputs:
            raise ModelError(f"{self.name}: not a decoder: no input_ids input (inputs: {', '.join(names[:6])}); {want}")
        if "logits" not in self.outputs:
            raise ModelError(f"{self.name}: not a decoder: no logits output (outputs: {', '.join(list(self.outputs)[:6])}); {want}")
        past = collections.defaultdict(set)
        for n in names:
            if m := PAST.match(n):
                past[int(m.group(1))].add(m.group(2))
        if not past:
            raise ModelError(f"{self.name}: a decoder without past key values (inputs: {', '.join(names[:6])}); export it with "
                             "past (optimum-cli export onnx --task text-generation-with-past), see docs/models.md")
        layers = max(past) + 1
        bad = [i for i in range(layers) if past.get(i) != {"key", "value"}]
        if bad:
            raise ModelError(f"{self.name}: past_key_values.{bad[0]}.key/value missing (a key and a value per layer 0..{layers - 1})")
        present = {(int(m.group(1)), m.group(2)) for o in self.outputs if (m := PRESENT.match(o))}
        if len(present) != 2 * layers:
            raise ModelError(f"{self.name}: {len(present)} present.N.key/value outputs for {layers} layers of past_key_values")
        unknown = [n for n in names if n not in ("input_ids", "attention_mask", "position_ids") and not PAST.match(n)]
        if unknown:
            raise ModelError(f"{self.name}: input '{unknown[0]}' is not a decoder input; {want}")
        dims = _dims(self.inputs["past_key_values.0.key"])
        if len(dims) != 4:
            raise ModelError(f"{self.name}: past_key_values.0.key has rank {len(dims)}, expected 4 [batch, kv heads, past, head size]")
        heads, size = (d if isinstance(d, int) and d > 0 else None for d in (dims[1], dims[3]))
        return layers, heads, size

    def dtype_of(self, name: str):
        from onnx.helper import tensor_dtype_to_np_dtype

        return tensor_dtype_to_np_dtype(self.inputs[name].type.tensor_type.elem_type)
