"""Weights in a blocked layout: how the host packs them and how the build finds them again.

`deploy.compiler.prepare.prepare` replaces a matmul weight parameter W [K, N] by Wp [N / PANEL, K, PANEL]
(`pack_weight` runs once over the real weights on the host) and recomputes W inside the function
as `reshape(permute_dims(Wp, [1, 0, 2]), [K, N])`, so the module stays correct for any pipeline.
At build time `rewrite_packed_dense` turns `matmul(x, <that expression>)` into the packed dense
kernel, and the unpacking disappears. The layout does not depend on the target, so the generic
module and every variant share one copy of the packed weights.
"""

from __future__ import annotations

import numpy as np

from edge.kernels import dense

PANEL = 16  # columns per panel: 2 AVX2 vectors, 1 AVX-512 vector, 4 NEON vectors


def pack_weight(w: np.ndarray, n: int = PANEL) -> np.ndarray:
    return dense.pack_weight(w, n)


def pack_matmul_weights(mod, params: list[np.ndarray], n: int = PANEL):
    """Host side: return (mod, params) with every weight used only as a matmul's right operand
    [K, N] (fp32, N a multiple of `n`) replaced by its packed form."""
    import tvm
    from tvm import relax

    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    uses = _uses(func)
    new_params = list(func.params)
    packed = {}  # weight var -> (packed var, K, N)
    params = list(params)
    for i, w in enumerate(func.params[num_input:]):
        if not _packable(w.ty, uses.get(w, []), w, n):
            continue
        k, cols = (int(d) for d in w.ty.shape.values)
        wp = relax.Var(str(w.name) + "_packed", relax.TensorType((cols // n, k, n), "float32"))
        new_params[num_input + i] = wp
        packed[w] = (wp, k, cols)
        params[i] = pack_weight(params[i], n)
    if not packed:
        return mod, params

    @relax.expr_functor.mutator
    class _Unpack(relax.PyExprMutator):
        def visit_var_(self, var):
            if var in packed:
                wp, k, cols = packed[var]
                return self.builder_.emit(relax.op.reshape(relax.op.permute_dims(wp, [1, 0, 2]), (k, cols)))
            return var

    body = _Unpack(mod).visit_expr(func.body)
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    mod["main"] = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    mod = relax.transform.Normalize()(mod)
    return mod, params


def _packable(sinfo, uses, w, n) -> bool:
    from tvm import relax

    if not isinstance(sinfo, relax.TensorType) or sinfo.dtype != "float32" or sinfo.ndim != 2:
        return False
    dims = sinfo.shape.values if sinfo.shape is not None else []
    if len(dims) != 2 or not all(hasattr(d, "value") for d in dims) or int(dims[1]) % n:
        return False
    return bool(uses) and all(
        isinstance(c, relax.Call) and c.op.name == "relax.matmul" and c.args[1].same_as(w) and not c.args[0].same_as(w)
        for c in uses
    )


def _uses(func) -> dict:
    """Map each var to its uses: the call taking it as an argument, or None for any other use."""
    from tvm import relax

    seen: dict = {}
    as_arg: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            seen[expr] = seen.get(expr, 0) + 1
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                if isinstance(a, relax.Var):
                    as_arg.setdefault(a, []).append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return {v: as_arg.get(v, []) + [None] * (n - len(as_arg.get(v, []))) for v, n in seen.items()}


def rewrite_packed_dense(mod, rows: int, *, var_rows: dict[str, int] | None = None, int8: str | None = None,
                         lanes: int | None = None):
    """Build side: matmul(x, reshape(permute_dims(Wp))) -> call_tir(packed dense kernel).

    `rows`: the register tile's rows where the row count is symbolic; `var_rows` overrides it when
    every symbolic row dim is one of its variables (a decoder's `num_seqs`: a decode step's rows,
    and the LM head's in prefill, are the few sequences in the batch, not their tokens).
    With `int8` (the instruction set of a module compiled for int8 activations, on a target with
    int8 dot products: edge.kernels.int8_matmuls), quantized weights get the int8-activation kernel
    (edge.kernels.dense_int8act) whatever their rows: prefill chunks, decode steps, the LM head.
    With `lanes` (the target's fp32 vector lanes), fp16 weights times a decode step's few static
    rows get edge.kernels.dense_f16."""
    import tvm
    from tvm import relax

    from edge.kernels import dense_f16, dense_int8act


    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            wp = self._packed_weight(call)
            if wp is None:
                return call
            x = call.args[0]
            m = 1
            for d in x.ty.shape.values[:-1]:
                m = m * int(d.value) if m is not None and hasattr(d, "value") else None
            symbolic = {str(v.name) for d in x.ty.shape.values[:-1] for v in tvm.tirx.analysis.undefined_vars(d)}
            sym_rows = [var_rows[v] for v in symbolic if v in (var_rows or {})]
            tile_rows = min(sym_rows) if sym_rows and len(sym_rows) == len(symbolic) else rows
            tile = min(tile_rows, m) if m else tile_rows  # a static batch of fewer rows: no wasted rows
            quant = dequant_args(self, wp)
            if quant is not None:  # weight-only quantized: dequantized in the kernel's inner loop
                if int8 and self._int8act_fits(x, quant):
                    return self._call_int8act(x, quant)
                if quant[2] is None:
                    return self.builder_.call_te(dense.compute_quant_sym, x, *quant[:2], tile, primfunc_name_hint="dense_quant")
                return self.builder_.call_te(dense.compute_quant, x, *quant, tile, primfunc_name_hint="dense_quant")
            f16 = widened_from(self, wp)  # fp16: widened in the kernel's inner loop
            if f16 is not None and self._f16_fits(x):
                return self._call_f16(x, f16)
            wp = wp if f16 is None else f16
            return self.builder_.call_te(dense.compute, x, wp, tile, primfunc_name_hint="dense_packed")

        def _f16_fits(self, x) -> bool:
            lead = [int(d) if hasattr(d, "value") else d for d in x.ty.shape.values[:-1]]
            k_dim = x.ty.shape.values[-1]
            return lanes is not None and hasattr(k_dim, "value") and dense_f16.applies(lead, int(k_dim), lanes)

        def _call_f16(self, x, wp):
            lead = [int(d) for d in x.ty.shape.values[:-1]]
            n_out = int(wp.ty.shape.values[0]) * int(wp.ty.shape.values[2])
            func = dense_f16.primfunc(lead, n_out, int(x.ty.shape.values[-1]))
            gv = self.builder_.add_func(func.with_attr("op_pattern", 8), "dense_f16")  # opaque: not fused
            return self.builder_.emit(relax.call_tir(gv, [x, wp], relax.TensorType([*lead, n_out], "float32")))

        def _int8act_fits(self, x, quant) -> bool:
            wq, scale, _ = quant
            lead = [d for d in x.ty.shape.values[:-1] if not hasattr(d, "value")]
            if len(lead) > 1 or (lead and not isinstance(lead[0], tvm.tirx.Var)):  # rows: static, or one variable
                return False
            if not all(hasattr(d, "value") for d in (*wq.ty.shape.values, *scale.ty.shape.values, x.ty.shape.values[-1])):
                return False
            bits = 4 if wq.ty.dtype == "uint8" else 8
            k_dim = int(x.ty.shape.values[-1])
            return dense_int8act.applies(k_dim, int(scale.ty.shape.values[1]), bits)

        def _call_int8act(self, x, quant):
            wq, scale, _ = quant
            x_shape = [int(d) if hasattr(d, "value") else d for d in x.ty.shape.values]
            n_out = int(wq.ty.shape.values[0]) * int(wq.ty.shape.values[2])
            func = dense_int8act.primfunc(x_shape, n_out, x_shape[-1], int(scale.ty.shape.values[1]), 4 if wq.ty.dtype == "uint8" else 8, int8,
                                       zero=quant[2] is not None, scale_dtype=str(scale.ty.dtype))
            gv = self.builder_.add_func(func.with_attr("op_pattern", 8), "dense_int8act")  # opaque: not fused
            out = relax.TensorType([*x_shape[:-1], n_out], "float32")
            return self.builder_.emit(relax.call_tir(gv, [x, *(a for a in quant if a is not None)], out))

        def _packed_weight(self, call):
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul" or not isinstance(call.args[1], relax.Var):
                return None
            x_sinfo = call.args[0].ty
            if not isinstance(x_sinfo, relax.TensorType) or x_sinfo.dtype != "float32" or x_sinfo.ndim < 2:
                return None
            wp = unpacked_from(self, call.args[1], [1, 0, 2])
            if wp is None or wp.ty.ndim != 3:
                return None
            return wp

    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    mod = rewriter.builder_.get()
    # Output-elementwise-fusable (a matmul): FuseOps then folds bias/activation/residual into it.
    # Left to AnnotateTIROpPattern, the min/% row indexing makes it opaque when rows are symbolic.
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("dense_packed", "dense_quant")):
            mod[gv] = func.with_attr("op_pattern", 4)
    return relax.transform.DeadCodeElimination()(mod)


def gather_compute(wp, ids):
    """Rows `ids` of W^T [N, K] read straight from the packed Wp [N / n, K, n]."""
    from tvm import te

    from tvm import tirx

    n = wp.shape[2]
    rows = wp.shape[0] * n

    def body(*i):
        t = tirx.max(tirx.min(ids[i[:-1]], (rows - 1).astype(ids.dtype)), tirx.const(0, ids.dtype))  # clamped, as gathers are
        return dense.as_f32(wp[t // n, i[-1], t % n])

    return te.compute((*ids.shape, wp.shape[1]), body, name="edgejit_gather_packed")


def gather_quant_compute(wq, scale, zero, ids):
    """Rows `ids` of W^T read from quantized packed codes (dequantized on the fly)."""
    from tvm import te, tirx

    weight = dense._quant_weight(wq, scale, zero)
    n = wq.shape[2]
    rows = wq.shape[0] * n

    def body(*i):
        t = tirx.max(tirx.min(ids[i[:-1]], (rows - 1).astype(ids.dtype)), tirx.const(0, ids.dtype))
        return weight(t // n, i[-1], t % n)

    k_dim = wq.shape[1] * 2 if dense._bits(wq) == 4 else wq.shape[1]
    return te.compute((*ids.shape, k_dim), body, name="edgejit_gather_quant")


def gather_quant_sym_compute(wq, scale, ids):
    """gather_quant_compute of symmetric 8-bit codes (no zero tensor)."""
    return gather_quant_compute(wq, scale, None, ids)


def unpacked_from(mutator, var, axes: list[int]):
    """The packed weight Wp when `var` is bound to reshape(permute_dims(Wp, axes)) (how models
    write a packed weight's unpacking), else None."""
    from tvm import relax

    reshape = mutator.lookup_binding(var) if isinstance(var, relax.Var) else None
    if not (isinstance(reshape, relax.Call) and getattr(reshape.op, "name", "") == "relax.reshape"):
        return None
    perm = reshape.args[0]
    if isinstance(perm, relax.Var):
        perm = mutator.lookup_binding(perm)
    if not (isinstance(perm, relax.Call) and getattr(perm.op, "name", "") == "relax.permute_dims"):
        return None
    if [int(a) for a in perm.attrs.axes] != axes or not isinstance(perm.args[0], relax.Var):
        return None
    return perm.args[0]


def _tir_call_args(mutator, var, prefix: str, n_args: int):
    """The arguments of the call_tir `var` is bound to when its function's name starts with
    `prefix` and it takes `n_args`, else None."""
    import tvm
    from tvm import relax

    if not isinstance(var, relax.Var):
        return None
    call = mutator.lookup_binding(var)
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
        return None
    gv = call.args[0]
    if not (isinstance(gv, tvm.ir.GlobalVar) and gv.name_hint.startswith(prefix)):
        return None
    args = list(call.args[1].fields)
    return tuple(args) if len(args) == n_args else None


def dequant_args(mutator, var):
    """(codes, scale, zero) when `var` is bound to the model's dequantize call, else None; zero is
    None for symmetric 8-bit codes (its `dequant_q8s` call has no zero tensor)."""
    sym = _tir_call_args(mutator, var, "dequant_q8s", 2)
    return (*sym, None) if sym else _tir_call_args(mutator, var, "dequant_q", 3)


def widened_from(mutator, var):
    """The fp16 weight when `var` is bound to the model's widening call (dense.widen), else None."""
    args = _tir_call_args(mutator, var, "widen_f16", 1)
    return args[0] if args else None


def rewrite_packed_gather(mod):
    """take(reshape(permute_dims(Wp, [0, 2, 1]), [N, K]), ids, axis=0) -> one gather kernel that
    reads the packed weight directly (a tied embedding shares the LM head's packed copy), instead
    of unpacking the whole table for every call."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.take" or int(call.attrs.axis) != 0:
                return call
            wp = unpacked_from(self, call.args[0], [0, 2, 1])
            if wp is None:
                return call
            quant = dequant_args(self, wp)
            if quant is not None and quant[2] is None:
                return self.builder_.call_te(gather_quant_sym_compute, *quant[:2], call.args[1], primfunc_name_hint="gather_quant")
            if quant is not None:
                return self.builder_.call_te(gather_quant_compute, *quant, call.args[1], primfunc_name_hint="gather_quant")
            f16 = widened_from(self, wp)
            wp = wp if f16 is None else f16
            return self.builder_.call_te(gather_compute, wp, call.args[1], primfunc_name_hint="gather_packed")

    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
