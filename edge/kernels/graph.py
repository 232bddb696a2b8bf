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


def expand_silu(mod):
    """silu(x) (fp32) -> x / (1 + exp(-x)), whose exp FastMathTransform then makes a vectorizable
    polynomial: legalized as it is, silu is a scalar libm expf call per element (SwiGLU's gate:
    SmolLM2, 46,080 per decoded token, ~3% of a decode step on one Zen 5 core)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Expand(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.silu"):
                return call
            x = call.args[0]
            if not isinstance(x.ty, relax.TensorType) or x.ty.dtype != "float32":
                return call
            e = self.builder_.emit(relax.op.exp(relax.op.negative(x)))
            return relax.op.divide(x, relax.op.add(relax.const(1.0, "float32"), e))

    expander = _Expand(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            expander.builder_.update_func(gv, expander.visit_expr(func))
    return expander.builder_.get()


def rewrite_softmax(mod, lanes: int):
    """softmax over the last axis (fp32) -> the chunked kernel of edge/kernels/softmax.py."""
    import tvm
    from tvm import relax, te

    from edge.kernels import softmax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.softmax"):
                return call
            x = call.args[0]
            ty = x.ty
            if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.ndim < 2 or ty.shape is None:
                return call
            probe = te.placeholder(list(ty.shape.values), "float32")
            if not softmax.applies(probe, int(call.attrs.axis)):
                return call
            return self.builder_.call_te(softmax.compute, x, lanes, primfunc_name_hint="softmax_rows")

    rewriter = _Rewrite(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
