"""POST /v1/embeddings (OpenAI's shape) for encoder artifacts: text (or token ids) -> one vector per
input, mean-pooled over the attention mask and L2-normalized, as sentence-transformers computes
all-MiniLM-L6-v2's sentence embeddings.

The text is tokenized with the artifact's own tokenizer.json (shipped in the artifact, checksummed
with the rest, when the compiled ONNX file had one beside it). The encoder runs on the daemon's
inference workers like /v1/models/<name>/infer (same admission, queue, JIT and metrics): inputs
sorted by length, batches right-padded with a zero attention mask.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import weakref

import numpy as np

from edge.serve import codec
from edge.serve.generation import ApiError

TOKENIZER_FILE = "tokenizer.json"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
BATCH = 32  # inputs per encoder call (sentence-transformers' default batch size), at most [server] max_batch

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_tok_lock = threading.Lock()


def tokenizer(runtime):
    """The artifact's tokenizer (no padding, no truncation), loaded once per loaded version; None
    if the artifact ships none."""
    with _tok_lock:
        if runtime in _tokenizers:
            return _tokenizers[runtime]
        tok = None
        if TOKENIZER_FILE in runtime.artifact.manifest.files:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(runtime.artifact.file(TOKENIZER_FILE)))
            except Exception as e:  # the Rust library raises its own Exception type
                raise ApiError(500, f"cannot read the model's {TOKENIZER_FILE}: {e}") from None
            tok.no_padding()
            tok.no_truncation()
        _tokenizers[runtime] = tok
        return tok


def parse_inputs(doc: dict) -> tuple[list, bool]:
    """The request's `input` as a list of strings or a list of token-id lists: (items, are_ids)."""
    x = doc.get("input")
    if isinstance(x, str):
        items = [x]
    elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        items = [x]  # one input given as token ids
    elif isinstance(x, list) and x:
        items = x
    else:
        raise ApiError(400, "'input' must be a string, a list of strings, a list of token ids or a list of such lists "
                            "(not empty)", param="input")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(items)} items; at most {MAX_INPUTS} per request", param="input")
    strings = all(isinstance(s, str) for s in items)
    ids = all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in items)
    if not (strings or ids):
        raise ApiError(400, "'input' must be all strings or all non-empty lists of token ids", param="input")
    for i, s in enumerate(items):
        if strings and not s:
            raise ApiError(400, f"input[{i}] is an empty string", param="input")
    return items, ids


def encoding_format(doc: dict) -> str:
    fmt = doc.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
    return fmt


def token_ids(runtime, items: list, are_ids: bool) -> list[list[int]]:
    """Token ids of every input, checked against the vocabulary and the artifact's longest sequence."""
    tok = tokenizer(runtime)
    if are_ids:
        seqs = [list(s) for s in items]
    elif tok is None:
        raise ApiError(400, f"model artifact '{runtime.artifact.name}' ships no {TOKENIZER_FILE}: send token ids, or "
                            f"compile the model with its {TOKENIZER_FILE} beside the ONNX file", param="input")
    else:
        seqs = [e.ids for e in tok.encode_batch(items, add_special_tokens=True)]
    vocab = _vocab(runtime, tok)
    max_seq = runtime.artifact.max_seq
    for i, s in enumerate(seqs):
        if vocab is not None and any(not 0 <= t < vocab for t in s):
            raise ApiError(400, f"input[{i}] has a token id outside the vocabulary (0..{vocab - 1})", param="input")
        if len(s) > max_seq:
            raise ApiError(400, f"This model's maximum context length is {max_seq} tokens; input[{i}] is {len(s)} tokens.",
                           param="input", code="context_length_exceeded")
    return seqs


def _vocab(runtime, tok) -> int | None:
    for spec in runtime.inputs:
        if spec.name == "input_ids" and spec.range:
            return int(spec.range[1]) + 1
    return tok.get_vocab_size(with_added_tokens=True) if tok is not None else None


def batch_inputs(runtime, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-padded input_ids, attention_mask (1 on tokens, 0 on padding) and zero token types,
    for the inputs the artifact takes."""
    n, width = len(seqs), max(map(len, seqs))
    ids = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width), np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    names = {s.name: s for s in runtime.inputs}
    if "input_ids" not in names:
        raise ApiError(400, f"model artifact '{runtime.artifact.name}' takes no input_ids: not a text encoder", param="model")
    return {k: a.astype(names[k].dtype) for k, a in arrays.items() if k in names}


def hidden_state_output(runtime) -> int:
    """Index of the per-token hidden states ([batch, seq, hidden], float): last_hidden_state by name,
    else the first rank-3 float output."""
    outs = runtime.outputs
    for i, s in enumerate(outs):
        if s.name == "last_hidden_state":
            return i
    for i, s in enumerate(outs):
        if len(s.shape) == 3 and s.dtype.startswith("float"):
            return i
    raise ApiError(400, f"model artifact '{runtime.artifact.name}' has no [batch, seq, hidden] output to pool", param="model")


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) then Normalize: the mean of the token vectors where the
    mask is 1 (count clamped at 1e-9), divided by its L2 norm (clamped at 1e-12, as torch's normalize)."""
    m = mask.astype(np.float32)[:, :, None]
    pooled = (hidden.astype(np.float32) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def response(name: str, vectors: np.ndarray, fmt: str, prompt_tokens: int) -> dict:
    data = []
    for i, v in enumerate(vectors):
        v = np.ascontiguousarray(v, dtype="<f4")
        emb = base64.b64encode(v.tobytes()).decode("ascii") if fmt == "base64" else [float(x) for x in v]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def serve(handler) -> tuple[str, int]:
    """POST /v1/embeddings on the daemon's HTTP handler (edge/serve/server.py): returns (model, status)."""
    from edge.serve.server import HttpError, Saturated

    svc = handler.service
    doc, name = handler._api_request(generation=False)
    start = time.perf_counter()
    dims = doc.get("dimensions")
    items, are_ids = parse_inputs(doc)
    fmt = encoding_format(doc)
    version = svc.registry.acquire(name)  # 404 unknown, 503 loading/failed
    handler._gen_model = name
    try:
        rt = version.runtime
        if getattr(rt, "is_generation", False):
            raise ApiError(400, f"model '{name}' is a text-generation model; /v1/embeddings needs an encoder artifact "
                                "(e.g. all-MiniLM-L6-v2)", param="model", code="model_not_embedding")
        out_index = hidden_state_output(rt)
        width = rt.outputs[out_index].shape[-1]
        if dims is not None and dims != width:
            raise ApiError(400, f"'dimensions' must be {width} for this model (it has no shortened embeddings)",
                           param="dimensions")
        seqs = token_ids(rt, items, are_ids)
    finally:
        svc.registry.release(name, version)
    batch = max(1, min(BATCH, svc.cfg.server.max_batch))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    vectors: list = [None] * len(seqs)
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        arrays = batch_inputs(rt, [seqs[i] for i in idx])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            future, ticket = svc.submit(name, buf.getvalue(), codec.NPZ, codec.NPZ)
        except Saturated as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        try:
            payload, _, _ = handler._wait(future, ticket, svc.cfg.server.request_timeout_s)
        except HttpError as e:
            raise ApiError(e.status, str(e), headers=e.headers) from None
        finally:
            ticket.release()
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            hidden = z[rt.outputs[out_index].name]
        for i, v in zip(idx, mean_pool_normalize(hidden, arrays["attention_mask"])):
            vectors[i] = v
    vectors = np.stack(vectors)
    svc.metrics.observe_request(name, time.perf_counter() - start)
    return name, handler._json(200, response(name, vectors, fmt, sum(map(len, seqs))))
