"""Read an ONNX model from disk and import it into Relax with the sequence dimension symbolic."""

from __future__ import annotations

from pathlib import Path

from edge.errors import ModelError


def load(path: str | Path):
    """Load and check an ONNX model, with its external data. One-line ModelError on any problem."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as e:
        raise ModelError(f"{path}: missing external data file {Path(e.filename).name if e.filename else e}") from None
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'parse error'})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (empty graph)")
    return model


def to_relax(model):
    """Import into Relax. Returns (IRModule whose main takes inputs then params, list of param arrays)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from . import onnx_converters

    try:
        with onnx_converters.patched():
            mod = from_onnx(model, keep_params_in_input=True)
    except Exception as e:
        raise ModelError(f"ONNX import failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]
