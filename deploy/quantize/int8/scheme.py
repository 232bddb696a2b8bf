"""int8 rewrite of a Relax module: float matmuls against weights -> int8 x int8 -> int32 kernels.

Every `matmul(x, W)` (or `matmul(x, permute_dims(W))`) whose W is a weight of `main` and whose
shapes the kernels handle becomes

    q, xs = quantize_rows(reshape(x, [M, K]))          # shared by matmuls that read the same x
    y     = qdense(q, xs, Wp, wcomp, ws, bias)          # int32 accumulate, dequantize + bias fused
    reshape(y, [..., N])

with `add(matmul(x, W), b)` folded into the kernel's epilogue when b is a weight vector. The weight
transforms (symmetric per-column int8 quantization, panel packing) run here, once, on the host;
the new weights replace W in the parameter list. See edge/kernels/int8.py for the kernels.

Which matmuls stay in float is `QuantOptions.keep_float`: `head` (a matmul whose result reaches a
model output without passing a layer norm or another quantized matmul: LM heads, poolers), or
glob patterns on weight names. Embeddings (gathers), layer norm, softmax and the attention
matmuls (activation x activation) are never quantized.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from edge.errors import EdgeJitError
from edge.kernels import int8 as kernels

CATEGORIES = ("embeddings", "layernorm", "softmax", "head")
DEFAULT_KEEP_FLOAT = CATEGORIES


class QuantizeError(EdgeJitError):
    """The model cannot be quantized as asked (bad options, bad calibration)."""


class NothingToQuantize(QuantizeError):
    """No matmul against a weight is left to quantize."""


@dataclass
class QuantOptions:
    activations: str = "dynamic"  # or "static": per-tensor scales from `ranges`
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    ranges: dict[str, float] | None = None  # static: site name -> max |x| from calibration
    exact: dict | None = None  # weight name -> (int8 [K, N], scale [N]) of a pre-quantized model
    report: dict = field(default_factory=dict)  # filled by quantize()


@dataclass
class Site:
    """One quantizable matmul."""

    var: object  # the binding var of the matmul
    call: object
    x: object  # activation expr
    weight: int  # index into params
    name: str
    transposed: bool
    k: int
    n: int
    bias: int | None = None  # index into params of a fused bias vector
    bias_call: object = None
    site: str = ""  # activation name (shared by matmuls reading the same x)
    epilogue: str = "none"  # or "gelu" / "gelu_tanh": a GELU after the matmul (+ bias), fused
    epilogue_call: object = None  # the call producing the GELU's result
    epilogue_var: object = None
    head: bool = False  # see _mark_heads


def _is_op(expr, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def check_keep_float(keep_float, weight_names: list[str]) -> None:
    for entry in keep_float:
        if entry in CATEGORIES:
            continue
        pattern = entry.replace(".", "_")
        if not any(fnmatch.fnmatchcase(n, entry) or fnmatch.fnmatchcase(n, pattern) for n in weight_names):
            raise QuantizeError(
                f"--keep-float entry '{entry}' is neither a category ({', '.join(CATEGORIES)}) nor a pattern matching a weight name"
            )


def find_sites(mod, params) -> tuple[list[Site], list[dict]]:
    """The quantizable matmuls of main, and the weight matmuls that are not (with the reason)."""
    from tvm import relax

    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    weight_index = {p: i for i, p in enumerate(main.params[num_input:])}
    bindings = {}
    uses: dict = {}
    order = []
    for block in main.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bindings[b.var] = b.value
            order.append(b.var)
            for v in relax.analysis.free_vars(b.value):
                uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(main.body.body):
        uses[v] = uses.get(v, 0) + 1

    sites, skipped = [], []
    by_var = {}
    for var in order:
        call = bindings[var]
        if not _is_op(call, "relax.matmul") or len(call.args) != 2:
            continue
        x, w = call.args
        transposed = False
        if w in bindings and _is_op(bindings[w], "relax.permute_dims"):
            axes = bindings[w].attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                w, transposed = bindings[w].args[0], True
        if w not in weight_index:
            continue  # activation x activation (attention): stays float
        idx = weight_index[w]
        name = w.name
        arr = params[idx]
        if arr.ndim != 2 or arr.dtype != np.float32 or str(x.ty.dtype) != "float32" or x.ty.ndim < 2:
            skipped.append({"weight": name, "reason": "not a 2-D fp32 weight"})
            continue
        k, n = (arr.shape[1], arr.shape[0]) if transposed else arr.shape
        if not kernels.supported(k, n):
            skipped.append({"weight": name, "reason": f"shape {k}x{n} not a multiple of {kernels.PANEL}"})
            continue
        site = Site(var=var, call=call, x=x, weight=idx, name=name, transposed=transposed, k=k, n=n)
        sites.append(site)
        by_var[var] = site
    # add(matmul, bias) -> bias in the epilogue, when the matmul result has no other use.
    for var in order:
        call = bindings[var]
        if not _is_op(call, "relax.add"):
            continue
        a, b = call.args
        if b in by_var:
            a, b = b, a
        site = by_var.get(a)
        if site is None or uses.get(a, 0) != 1 or b not in weight_index or site.bias is not None:
            continue
        barr = params[weight_index[b]]
        if barr.dtype == np.float32 and barr.shape == (site.n,):
            site.bias, site.bias_call = weight_index[b], call
    _find_gelu(sites, order, bindings, params, weight_index, main.body.body)
    # Name each activation; matmuls reading the same x share its quantization.
    names: dict = {}
    for s in sites:
        s.site = names.setdefault(s.x, f"act{len(names)}:{s.name}")
    _mark_heads(main, bindings, by_var, sites)
    return sites, skipped


_ELEMENTWISE = {
    "relax.multiply": np.multiply, "relax.add": np.add, "relax.subtract": np.subtract,
    "relax.divide": np.divide, "relax.power": np.power, "relax.tanh": np.tanh, "relax.erf": None,
    "relax.reshape": lambda x, *_: x,
}


def _find_gelu(sites, order, bindings, params, weight_index, body) -> None:
    """Mark sites whose result feeds only an elementwise chain that computes a GELU (erf, or
    GPT-2's tanh form).

    The chain is found structurally (elementwise ops and reshapes whose other operands are
    scalars) and recognised numerically: it is evaluated on test points and compared with each
    GELU, so any arrangement of x * 0.5 * (1 + erf(x / sqrt 2)) an exporter writes is accepted.
    """
    import math

    import tvm
    from tvm import relax

    users: dict = {}
    for v in order:
        for u in relax.analysis.free_vars(bindings[v]):
            users.setdefault(u, []).append(v)
    outputs = set(relax.analysis.free_vars(body))

    def scalar(e):
        if isinstance(e, tvm.ir.expr.Constant):
            a = e.value.numpy()
        elif e in weight_index:
            a = params[weight_index[e]]
        else:
            return None
        return a.astype(np.float64).reshape(()) if a.size == 1 else None

    pos = {v: i for i, v in enumerate(order)}
    test = np.linspace(-6, 6, 97)
    exact = {
        "gelu": test * 0.5 * (1 + np.vectorize(math.erf)(test / math.sqrt(2))),
        "gelu_tanh": test * 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (test + 0.044715 * test**3))),
    }
    for s in sites:
        start = s.var if s.bias_call is None else next(v for v in order if bindings[v].same_as(s.bias_call))
        if start in outputs:
            continue
        chain, values = [start], {start: test}
        ok = True
        i = pos[start] + 1
        # Walk the following bindings in order while they only read the chain and scalars.
        members = {start}
        while i < len(order) and len(members) < 16:
            v = order[i]
            call = bindings[v]
            i += 1
            args = getattr(call, "args", None)
            if args is None or not any(a in members for a in args):
                continue
            name = getattr(call.op, "name", None)
            if name not in _ELEMENTWISE:
                ok = False
                break
            vals = []
            for a in args if name != "relax.reshape" else args[:1]:
                if a in members:
                    vals.append(values[a])
                else:
                    c = scalar(a)
                    if c is None:
                        ok = False
                        break
                    vals.append(c)
            if not ok:
                break
            fn = _ELEMENTWISE[name]
            values[v] = np.vectorize(math.erf)(vals[0]) if fn is None else fn(*vals)
            members.add(v)
            chain.append(v)
            # A candidate when every member but v is used only inside the chain.
            closed = all(all(u in members for u in users.get(m, [])) and m not in outputs for m in members if m is not v)
            match = [k for k, ref in exact.items() if np.allclose(values[v], ref, atol=1e-5, rtol=1e-5)]
            if closed and len(chain) > 2 and match:
                s.epilogue, s.epilogue_call, s.epilogue_var = match[0], bindings[v], v
                break


def _mark_heads(main, bindings, by_var, sites) -> None:
    """A head is a quantizable matmul whose result reaches an output without passing a layer
    norm or another quantizable matmul."""
    from tvm import relax

    stack = list(relax.analysis.free_vars(main.body.body))
    seen = set()
    heads = set()
    while stack:
        v = stack.pop()
        if v in seen or v not in bindings:
            continue
        seen.add(v)
        if v in by_var:
            heads.add(v)
            continue
        value = bindings[v]
        if _is_op(value, "relax.nn.layer_norm") or _is_op(value, "relax.nn.rms_norm"):
            continue
        for s in sites:
            if s.bias_call is not None and s.bias_call.same_as(value):
                heads.add(s.var)
        stack.extend(relax.analysis.free_vars(value))
    for s in sites:
        s.head = s.var in heads


def select(sites: list[Site], keep_float) -> tuple[list[Site], list[dict]]:
    chosen, kept = [], []
    patterns = [e for e in keep_float if e not in CATEGORIES]
    for s in sites:
        if "head" in keep_float and s.head:
            kept.append({"weight": s.name, "reason": "head (--keep-float head)"})
        elif any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.name, p.replace(".", "_")) for p in patterns):
            kept.append({"weight": s.name, "reason": "--keep-float pattern"})
        else:
            chosen.append(s)
    return chosen, kept


def quantize(mod, params: list[np.ndarray], target, options: QuantOptions | None = None):
    """Rewrite `mod` (params as main's trailing inputs) for int8; returns (mod, params).
    Fills options.report with what was quantized and what stayed float."""
    options = options or QuantOptions()
    if options.activations not in ("dynamic", "static"):
        raise QuantizeError(f"unknown activation quantization '{options.activations}' (dynamic or static)")
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    weight_names = [p.name for p in main.params[num_input:]]
    check_keep_float(options.keep_float, weight_names)
    sites, skipped = find_sites(mod, params)
    chosen, kept = select(sites, options.keep_float)
    options.report = {
        "activations": options.activations,
        "quantized": len(chosen),
        "fused_gelu": sum(s.epilogue != "none" for s in chosen),
        "float": skipped + kept,
        "keep_float": list(options.keep_float),
    }
    if not chosen:
        raise NothingToQuantize(
            "no quantizable matmul in the model (" + (f"{len(sites)} kept in float by --keep-float" if sites else "no matmul against a 2-D fp32 weight") + ")"
        )
    if options.activations == "static":
        ranges = options.ranges or {}
        missing = sorted({s.site for s in chosen if s.site not in ranges})
        if missing:
            raise QuantizeError(f"calibration has no range for activation {missing[0]} ({len(missing)} missing)")
    isa = kernels.isa_of(target)
    options.report["isa"] = isa
    return _rewrite(mod, params, chosen, isa, options)


def _rewrite(mod, params, chosen: list[Site], isa: str, options: QuantOptions):
    from tvm import relax

    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    new_params: list[np.ndarray] = []
    new_vars: list = []

    def add_param(name, arr):
        v = relax.Var(name, relax.TensorType(list(arr.shape), str(arr.dtype)))
        new_vars.append(v)
        new_params.append(arr)
        return v

    weights = {}
    for s in chosen:
        if s.weight in weights:
            continue
        w = params[s.weight].T if s.transposed else params[s.weight]
        given = (options.exact or {}).get(s.name)
        if given is not None and not s.transposed and given[0].shape == w.shape:
            wq, ws = given  # the model's own int8 weights, used as they are
        else:
            wq, ws = kernels.quantize_weight(w)
        wp, wc = kernels.pack_weight(wq, isa)
        weights[s.weight] = (add_param(f"{s.name}_i8", wp), add_param(f"{s.name}_comp", wc), add_param(f"{s.name}_scale", ws))
    zero_bias = {}
    scales = {}
    if options.activations == "static":
        for s in chosen:
            if s.site not in scales:
                amax = float(options.ranges[s.site])
                scales[s.site] = add_param(f"act_scale_{len(scales)}", np.array([amax / 127.0 if amax > 0 else 1.0], dtype=np.float32))

    by_call = {}
    by_bias = {}
    for s in chosen:
        if s.epilogue_call is not None:
            by_call[s.epilogue_call] = s
        elif s.bias_call is not None:
            by_bias[s.bias_call] = s
        else:
            by_call[s.call] = s

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.funcs = {}
            self.quantized = {}

        def func(self, key, make):
            if key not in self.funcs:
                name = "edgejit_" + "_".join(str(p) for p in key)
                self.funcs[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
            return self.funcs[key]

        def visit_call_(self, call):
            site = by_bias.get(call) or by_call.get(call)
            if site is None:
                return super().visit_call_(call)
            x = self.visit_expr(site.x)
            shape = list(x.ty.shape.values)
            m = shape[0]
            for d in shape[1:-1]:
                m = m * d
            if site.site not in self.quantized:
                x2 = self.builder_.emit(relax.op.reshape(x, [m, site.k])) if len(shape) != 2 else x
                qdtype = kernels.activation_dtype(isa)
                out_ty = [relax.TensorType([m, site.k], qdtype), relax.TensorType([m], "float32")]
                if options.activations == "static":
                    gv = self.func(("quantize_static", site.k, isa), lambda: kernels.quantize_rows(site.k, isa, static=True))
                    qx = self.builder_.emit(relax.call_tir(gv, [x2, scales[site.site]], out_ty))
                else:
                    gv = self.func(("quantize", site.k, isa), lambda: kernels.quantize_rows(site.k, isa))
                    qx = self.builder_.emit(relax.call_tir(gv, [x2], out_ty))
                self.quantized[site.site] = (self.builder_.emit(relax.TupleGetItem(qx, 0)), self.builder_.emit(relax.TupleGetItem(qx, 1)))
            q, xs = self.quantized[site.site]
            wp, wc, ws = weights[site.weight]
            if site.bias is not None:
                bias = main.params[num_input + site.bias]
            else:
                if site.n not in zero_bias:
                    zero_bias[site.n] = add_param(f"zero_bias_{site.n}", np.zeros(site.n, dtype=np.float32))
                bias = zero_bias[site.n]
            key = ("qdense", site.k, site.n, isa) + ((site.epilogue,) if site.epilogue != "none" else ())
            gv = self.func(key, lambda: kernels.qdense(site.k, site.n, isa, site.epilogue))
            y = self.builder_.emit(relax.call_tir(gv, [q, xs, wp, wc, ws, bias], relax.TensorType([m, site.n], "float32")))
            if site.epilogue_var is not None:
                out_shape = list(site.epilogue_var.ty.shape.values)
            else:
                out_shape = [*shape[:-1], site.n]
            if len(out_shape) != 2 or len(shape) != 2:
                y = relax.op.reshape(y, out_shape)
            return y

    rw = Rewriter(mod)
    new_main = rw.visit_expr(main)
    out = rw.builder_.get()
    params_all = list(main.params) + new_vars
    func = relax.Function(params_all, new_main.body, new_main.ret_ty, new_main.is_pure, main.attrs)
    out["main"] = func
    out = relax.transform.DeadCodeElimination(["main"])(out)
    # Drop weights nothing reads any more (the float copies of quantized matmuls).
    main2 = out["main"]
    used = set(relax.analysis.free_vars(main2.body))
    old_params = list(params) + new_params
    keep = list(main2.params[:num_input])
    kept_params = []
    for v, arr in zip(main2.params[num_input:], old_params):
        if v in used:
            keep.append(v)
            kept_params.append(arr)
    out["main"] = relax.Function(keep, main2.body, main2.ret_ty, main2.is_pure, main2.attrs)
    return out, kept_params
