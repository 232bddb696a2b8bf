"""Relax-level rewrites before legalization that make the lowered code vectorizable."""

from __future__ import annotations


def expand_small_powers(mod):
    """power(x, 2 or 3) -> x * x (* x): GELU-tanh's x**3 would otherwise be a scalar powf call."""
    import numpy as np
    from tvm import relax

    def rewrite(builder, call):
        x, e = call.args
        if not isinstance(e, type(relax.const(1.0))):
            return None
        value = np.asarray(e.value.numpy())
        if value.size != 1:
            return None
        p = float(value.reshape(()))
        if p not in (2.0, 3.0) or x.ty.dtype != "float32" or call.ty.dtype != "float32":
            return None
        sq = builder.emit(relax.op.multiply(x, x))
        return sq if p == 2.0 else relax.op.multiply(sq, x)

    return _rewrite_calls(mod, "relax.power", rewrite)


def expand_silu(mod):
    """silu(x) (fp32) -> x / (1 + exp(-x)), whose exp FastMathTransform then makes a vectorizable
    polynomial: legalized as it is, silu is a scalar libm expf call per element (SwiGLU's gate:
    SmolLM2, 46,080 per decoded token, ~3% of a decode step on one Zen 5 core)."""
    from tvm import relax

    def rewrite(builder, call):
        x = call.args[0]
        if not isinstance(x.ty, relax.TensorType) or x.ty.dtype != "float32":
            return None
        e = builder.emit(relax.op.exp(relax.op.negative(x)))
        return relax.op.divide(x, relax.op.add(relax.const(1.0, "float32"), e))

    return _rewrite_calls(mod, "relax.nn.silu", rewrite)


def rewrite_softmax(mod, lanes: int):
    """softmax over the last axis (fp32) -> the chunked kernel of edge/kernels/softmax.py."""
    from tvm import relax, te

    from edge.kernels import softmax

    def rewrite(builder, call):
        x = call.args[0]
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.ndim < 2 or ty.shape is None:
            return None
        probe = te.placeholder(list(ty.shape.values), "float32")
        if not softmax.applies(probe, int(call.attrs.axis)):
            return None
        return builder.call_te(softmax.compute, x, lanes, primfunc_name_hint="softmax_rows")

    return _rewrite_calls(mod, "relax.nn.softmax", rewrite)


def _rewrite_calls(mod, op_name: str, rewrite):
    """`mod` with every call of the Relax op `op_name` in its Relax functions replaced by
    `rewrite(builder, call)`, where that returns an expression (None: the call stays)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == op_name):
                return call
            out = rewrite(self.builder_, call)
            return call if out is None else out

    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
