"""Fixes to TVM 0.27's Relax ONNX converters for the graphs real exporters produce.

Each class replaces one entry of the frontend's converter map while `patched()` is active; the
frontend module itself is left untouched outside that block. Every fix names the exporter pattern
that breaks the stock converter (tests/deploy/test_onnx_import.py has a graph for each).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

_lock = threading.Lock()  # the patch is process-wide: one import at a time


def _frontend():
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend


def _converters() -> dict:
    F = _frontend()
    from tvm import relax

    class ConstantOfShape(F.ConstantOfShape):
        """TorchScript BERT/GPT-2 masks: ConstantOfShape of an empty shape (a scalar) with a
        one-element `value`; the stock converter broadcasts the [1] value to rank 0 and fails."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            attr_value = attr.get("value")
            if attr_value is not None:
                value = F.get_numpy(attr_value)
                if value.ndim:
                    attr = dict(attr)
                    attr["value"] = _scalar_tensor_proto(value.reshape(()))
            return super()._impl_v9(bb, inputs, attr, params)

    class Range(F.Range):
        """Position ids and mask indices: Range(0, seq, 1) with `seq` from a Shape chain. The stock
        converter computes the length at run time and names it with a fresh var (`range_len_0`),
        so it no longer matches `seq` and every later broadcast against the activations loses its
        shape. With integer bounds known symbolically we emit `arange` directly: length `seq`."""

        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            bounds = [_prim_scalar(F.get_constant(x, params)) for x in inputs[:3]]
            if all(b is not None for b in bounds):
                dtypes = {_prim_dtype(b) for b in bounds if not isinstance(b, int)}
                const_dtype = _const_dtype(F.get_constant(inputs[0], params))
                dtype = const_dtype or (dtypes.pop() if len(dtypes) == 1 else None)
                if dtype in ("int32", "int64"):
                    start, limit, delta = (_as_int64(b) for b in bounds)
                    if isinstance(delta, int) and delta > 0:  # negative steps: stock path
                        return relax.op.arange(start, limit, delta, dtype)
            return super()._impl_v12(bb, inputs, attr, params)

    return {"ConstantOfShape": ConstantOfShape, "Range": Range}


def _prim_scalar(x):
    """An int, or a symbolic integer PrimExpr, for a scalar known at import time; else None."""
    import tvm

    if isinstance(x, tvm.ir.GenericConst):
        v = x.value.numpy()
        if v.size == 1 and np.issubdtype(v.dtype, np.integer):
            return int(v.reshape(()))
        return None
    if tvm.ir.is_prim_expr(x) and "int" in _prim_dtype(x):
        return x
    return None


def _prim_dtype(x) -> str:
    try:
        return str(x.dtype)
    except Exception:  # tirx.Var keeps its dtype in .ty
        return str(x.ty)


def _const_dtype(x):
    import tvm

    return str(x.value.numpy().dtype) if isinstance(x, tvm.ir.GenericConst) else None


def _as_int64(b):
    from tvm import tirx

    if isinstance(b, int) or _prim_dtype(b) == "int64":
        return b
    return tirx.Cast("int64", b)


def _scalar_tensor_proto(value: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(value)


@contextlib.contextmanager
def patched():
    """Make the frontend use our converters (for ops we fix) inside the block. Yields a dict whose
    "node" entry is (op_type, node name) of the node being converted, for error messages."""
    F = _frontend()
    fixes = _converters()
    where: dict = {}
    with _lock:
        original_map = F._get_convert_map
        original_convert = F.ONNXGraphImporter._convert_operator

        def convert_map():
            m = dict(original_map())
            m.update(fixes)
            return m

        def convert_operator(self, op_name, inputs, attrs, opset):
            where["node"] = (op_name, str(attrs.get("tvm_custom", {}).get("name", "")))
            return original_convert(self, op_name, inputs, attrs, opset)

        F._get_convert_map = convert_map
        F.ONNXGraphImporter._convert_operator = convert_operator
        try:
            yield where
        finally:
            F._get_convert_map = original_map
            F.ONNXGraphImporter._convert_operator = original_convert


def supported_ops() -> set[str]:
    """ONNX op types the (patched) frontend can convert."""
    F = _frontend()
    return set(F._get_convert_map()) | set(_converters()) | {"If", "Constant"}
