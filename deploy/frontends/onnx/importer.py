"""Read an ONNX model from disk and import it into Relax with the sequence dimension symbolic.

`load` reads, checks and normalizes (deploy/frontends/onnx/normalize.py) the model; `to_relax` checks every
operator is convertible, then imports it with TVM's frontend plus our converter fixes
(deploy/frontends/onnx/converters.py). Every failure is a one-line ModelError.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import warnings
from pathlib import Path

from edge.errors import ModelError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def load(path: str | Path):
    """Load and check an ONNX model, with its external data. One-line ModelError on any problem."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model, or a truncated one ({type(e).__name__}: {_first_line(e)})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (empty graph)")
    _check_external_files(model, path)
    _check(str(path), str(path))  # by path: follows external data, and works past protobuf's 2 GB
    _load_external_data(model, path)
    from deploy.frontends.onnx.normalize import normalize

    return normalize(model)


def load_model(model, source: str = "model"):
    """Check and normalize an in-memory ModelProto (weights already loaded, under 2 GB)."""
    from deploy.frontends.onnx.normalize import normalize

    _check(model, source)
    return normalize(model)


def _check(model_or_path, source: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_or_path)
    except Exception as e:
        raise ModelError(f"{source}: invalid ONNX model: {_first_line(e)}") from None


def _check_external_files(model, path: Path) -> None:
    """Every external data file exists and stays inside the model's directory."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for t in _all_tensors(model):
        if not uses_external_data(t):
            continue
        location = ExternalDataInfo(t).location
        target = (path.parent / location).resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise ModelError(f"{path}: external data '{location}' of tensor '{t.name}' is outside the model's directory")
        if not target.is_file():
            raise ModelError(f"{path}: missing external data file '{location}' (tensor '{t.name}')")


def _load_external_data(model, path: Path) -> None:
    """Read tensors kept in external data files (checked by _check_external_files)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if not any(uses_external_data(t) for t in _all_tensors(model)):
        return
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise ModelError(f"{path}: bad external data ({_first_line(e)})") from None


def _all_tensors(model):
    """Initializers and Constant node values, subgraphs included."""

    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from walk(a.g)
                for g in a.graphs:
                    yield from walk(g)

    return list(walk(model.graph))


def unsupported_ops(model) -> list[tuple[str, str]]:
    """(op_type, node name) of nodes the importer can't convert, in graph order (subgraphs too)."""
    from deploy.frontends.onnx.converters import supported_ops

    ok = supported_ops()
    bad = []

    def walk(graph):
        for i, node in enumerate(graph.node):
            if node.op_type not in ok:
                bad.append((node.op_type if not node.domain else f"{node.domain}.{node.op_type}", node.name or f"#{i}"))
            for a in node.attribute:
                if a.g.node:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return bad


def check_supported(model) -> None:
    bad = unsupported_ops(model)
    if bad:
        op, node = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(sorted({o for o, _ in bad[1:]}))})" if len(bad) > 1 else ""
        raise ModelError(f"unsupported operator {op} at node '{node}'{more}")


@contextlib.contextmanager
def _quiet():
    """The frontend prints conversion errors to stdout, warns about every renamed input, and TVM
    logs from C++ to fd 2 (e.g. when a half-built BlockBuilder is collected): keep all that out of
    our one-line errors."""
    saved = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        sink = tempfile.TemporaryFile()
        os.dup2(sink.fileno(), 2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. embedded): just don't redirect
        saved = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved is not None:
            gc.collect()
            os.dup2(saved, 2)
            os.close(saved)
            sink.close()


def to_relax(model):
    """Import into Relax. Returns (IRModule whose main takes inputs then params, list of param arrays)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from deploy.frontends.onnx import converters as onnx_converters

    check_supported(model)
    error = None
    with _quiet():
        try:
            with onnx_converters.patched() as where:
                mod = from_onnx(model, keep_params_in_input=True)
        except Exception as e:
            node = where.get("node")
            at = f" at node '{node[1]}' ({node[0]})" if node else ""
            error = f"ONNX import failed{at}: {_first_line(e)}"
    if error is not None:
        raise ModelError(error)
    _check_output_shapes(mod, [o.name for o in model.graph.output])
    mod = clip_gathers(mod)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]


def clip_gathers(mod):
    """Gathers clamp their indices instead of trusting them (the frontend's "fast" mode reads out of
    bounds on a bad index): the runtime checks token ids against the vocabulary, but indices
    computed inside the graph are not checked by anyone. Clamping costs nothing measurable."""
    import tvm
    from tvm import relax

    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class _Clip(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op.same_as(take) and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], axis=call.attrs.axis, mode="clip")
            return call

    mutator = _Clip(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _check_output_shapes(mod, names: list[str]) -> None:
    """Every output must come out with a known shape (symbolic dims allowed): a shape lost in some
    shape-arithmetic chain would otherwise surface later as an obscure build error."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    for i, t in enumerate(fields):
        if isinstance(t, relax.TensorType) and t.shape is None:
            name = names[i] if i < len(names) else f"#{i}"
            raise ModelError(f"ONNX import lost the shape of output '{name}' (rank {t.ndim}): shape arithmetic the importer can't follow")
