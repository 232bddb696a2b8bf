"""Relax-level rewrites before legalization that make the lowered code vectorizable."""

from __future__ import annotations


def expand_small_powers(mod):
    """power(x, 2 or 3) -> x * x (* x): GELU-tanh's x**3 would otherwise be a scalar powf call."""
    import numpy as np
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Expand(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.power"):
                return call
            x, e = call.args
            if not isinstance(e, type(relax.const(1.0))):
                return call
            value = np.asarray(e.value.numpy())
            if value.size != 1:
                return call
            p = float(value.reshape(()))
            if p not in (2.0, 3.0) or x.ty.dtype != "float32" or call.ty.dtype != "float32":
                return call
            sq = self.builder_.emit(relax.op.multiply(x, x))
            return sq if p == 2.0 else relax.op.multiply(sq, x)

    expander = _Expand(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            expander.builder_.update_func(gv, expander.visit_expr(func))
    return expander.builder_.get()
