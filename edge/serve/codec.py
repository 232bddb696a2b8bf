"""Request and response bodies of the inference endpoint.

JSON for small inputs: {"inputs": {"input_ids": [[101, 2023, 102]]}} -> {"outputs": {name: nested lists}}.
NPZ for large ones (Content-Type: application/x-npz): an uncompressed or compressed numpy .npz
archive with one array per input name; the response is an .npz with one array per output name.
Arrays are read with allow_pickle=False and their decompressed size is bounded before reading.
"""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np

from edge.runtime import signature
from edge.errors import InputError

JSON = "application/json"
NPZ = "application/x-npz"


class BadRequest(InputError):
    """The body cannot be decoded (status 400 unless `status` says otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def media_type(header: str | None) -> str:
    return (header or JSON).split(";")[0].strip().lower() or JSON


def decode_inputs(body: bytes, content_type: str, specs, max_bytes: int) -> dict[str, np.ndarray]:
    kind = media_type(content_type)
    if kind == NPZ:
        arrays = _decode_npz(body, max_bytes)
    elif kind in ("application/octet-stream", "application/x-npy", "multipart/form-data"):
        raise BadRequest(f"unsupported Content-Type '{kind}' (use {JSON} or {NPZ})", status=415)
    else:  # JSON, and whatever curl -d sends by default
        arrays = _decode_json(body, specs)
    return fill_defaults(specs, arrays)


def _decode_json(body: bytes, specs) -> dict[str, np.ndarray]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise BadRequest('the body must be a JSON object {"inputs": {"<input name>": <nested list>, ...}}')
    by_name = {s.name: s for s in specs}
    arrays = {}
    for name, value in doc["inputs"].items():
        spec = by_name.get(name)
        if spec is None:
            raise BadRequest(f"unknown input '{name}' (the model takes: {', '.join(by_name)})")
        arrays[name] = _json_array(name, value, spec.dtype)
    return arrays


def _json_array(name: str, value, dtype: str) -> np.ndarray:
    want = np.dtype(dtype)
    try:
        a = np.array(value)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"input '{name}': not a rectangular nested list of numbers ({e})") from None
    if a.dtype == object or a.dtype.kind in "USV":
        raise BadRequest(f"input '{name}': not a rectangular nested list of numbers")
    if a.size == 0:
        a = a.astype(want)
    if want.kind in "iu":
        if a.dtype.kind == "f":
            raise BadRequest(f"input '{name}': expected integers ({dtype}), got floating-point numbers")
        if a.dtype.kind == "b":
            raise BadRequest(f"input '{name}': expected integers ({dtype}), got booleans")
        info = np.iinfo(want)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise BadRequest(f"input '{name}': values outside the range of {dtype}")
    elif want.kind == "b" and a.dtype.kind != "b":
        raise BadRequest(f"input '{name}': expected booleans")
    return a.astype(want, copy=False)


def _decode_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise BadRequest(f"malformed npz body: {e}") from None
    if total > max_bytes:
        raise BadRequest(f"npz body expands to {total} bytes, more than the limit of {max_bytes}", status=413)
    _check_npy_headers(body, max_bytes)
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise BadRequest(f"malformed npz body: {e}") from None


def _check_npy_headers(body: bytes, max_bytes: int) -> None:
    """What each array's .npy header claims (dtype x shape) is bounded and matches the bytes that
    follow it, before numpy allocates anything for it: a header claiming (1, 2**40) is a 413."""
    fmt = np.lib.format
    claimed = 0
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with z.open(info) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = fmt.read_array_header_2_0(f)
                    else:
                        raise BadRequest(f"malformed npz body: array '{name}': .npy format version {version} is not supported")
                    offset = f.tell()
                if dtype.hasobject:
                    raise BadRequest(f"malformed npz body: array '{name}' holds Python objects (not allowed)")
                count = math.prod(int(d) for d in shape)
                nbytes = count * dtype.itemsize
                claimed += nbytes
                if claimed > max_bytes:
                    raise BadRequest(f"npz array '{name}' claims shape {tuple(shape)} of {dtype} ({nbytes} bytes): "
                                     f"more than the limit of {max_bytes} bytes", status=413)
                if nbytes != info.file_size - offset:
                    raise BadRequest(f"malformed npz body: array '{name}' has {info.file_size - offset} bytes of data, "
                                     f"its header claims {nbytes} (shape {tuple(shape)} of {dtype})")
    except BadRequest:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError, OverflowError) as e:
        raise BadRequest(f"malformed npz body: {e}") from None


def check_batch(specs, arrays: dict[str, np.ndarray], max_batch: int) -> None:
    """Dim 0 of an input whose dim 0 is symbolic is the batch; bound it."""
    for s in specs:
        a = arrays.get(s.name)
        if a is not None and a.ndim and s.shape and isinstance(s.shape[0], str) and a.shape[0] > max_batch:
            raise BadRequest(f"batch of {a.shape[0]} is over the limit of {max_batch} (split the request, or raise [server] max_batch)", status=413)


def fill_defaults(specs, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """edge.runtime.signature.fill_defaults, after reporting a wrong rank as such (not as a missing mask)."""
    for s in specs:
        a = arrays.get(s.name)
        if a is not None and a.ndim != len(s.shape):
            raise BadRequest(f"input '{s.name}': rank {a.ndim} (shape {list(a.shape)}), expected rank {len(s.shape)} {list(s.shape)}")
    return signature.fill_defaults(specs, arrays)


def encode_outputs(model: str, specs, outputs: list[np.ndarray], accept: str, extra: dict) -> tuple[bytes, str]:
    if media_type(accept) == NPZ:
        buf = io.BytesIO()
        np.savez(buf, **{s.name: o for s, o in zip(specs, outputs)})
        return buf.getvalue(), NPZ
    doc = {
        "model": model,
        "outputs": {s.name: _jsonable(o) for s, o in zip(specs, outputs)},
        "shapes": {s.name: list(o.shape) for s, o in zip(specs, outputs)},
        **extra,
    }
    return json.dumps(doc, separators=(",", ":")).encode(), JSON


def _jsonable(a: np.ndarray):
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        # JSON has no NaN/Infinity: send them as null rather than invalid JSON.
        return [_jsonable(x) for x in a] if a.ndim else (None if not math.isfinite(float(a)) else float(a))
    return a.tolist()
