"""Text generation in the daemon: a decoder artifact's loaded model and generation engine, and the
OpenAI-compatible request and response documents (POST /v1/chat/completions, /v1/completions).

The HTTP side (reading the body, the SSE framing, client disconnects) is in server.py; this module
turns an OpenAI request document into a prompt and sampling parameters, and engine output into
OpenAI response and chunk documents. Errors are `ApiError`s, answered in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid

from edge.errors import ArtifactError, EdgeJitError

log = logging.getLogger("edgejit.daemon")

MAX_STOPS = 16


class ApiError(EdgeJitError):
    """An OpenAI-API error: status, message, the request field it is about, a machine code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_doc(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def is_decoder_artifact(path) -> bool:
    """A quick look at the manifest's kind, to choose how to load (the load itself verifies it)."""
    from pathlib import Path

    try:
        return json.loads((Path(path) / "manifest.json").read_bytes()).get("kind") == "decoder"
    except (OSError, ValueError, AttributeError):
        return False  # the runtime's load reports what is wrong with it


class GenerationModel:
    """One loaded version of a decoder model: LoadedDecoder + Engine. Stands where a Runtime
    stands for tensor models (Version.runtime), with the few attributes the daemon reads."""

    is_generation = True

    def __init__(self, loaded, engine, listeners=()):
        self.loaded, self.engine = loaded, engine
        self.artifact = loaded.artifact
        self.name = loaded.name
        self.listeners = list(listeners)  # on_generation(model_name, stats) when a request ends

    @classmethod
    def load(cls, path, *, context: int | None, max_seqs: int, max_queue: int, timeout_s: float,
             prefill_chunk: int | None, threads: int | None, trust, jit=None, cache_dir=None, state_dir=None,
             listeners=(), prefix_cache_tokens: int = 0, kv_cache_mb: float = 0) -> "GenerationModel":
        from edge.generate.engine import Engine
        from edge.generate.loader import load_decoder

        loaded = load_decoder(path, context=context or None, max_batch=max_seqs, threads=threads, trust=trust,
                              jit=jit, cache_dir=cache_dir, state_dir=state_dir, listeners=listeners,
                              kv_bytes=int(kv_cache_mb * 2**20) or None, extra_kv_tokens=prefix_cache_tokens)
        try:
            cls._check_logits(loaded)
            engine = Engine(loaded, max_queue=max_queue, prefill_chunk=prefill_chunk or None, timeout_s=timeout_s,
                            prefix_cache_tokens=prefix_cache_tokens)
        except BaseException:
            if loaded.decoder.specializer is not None:
                loaded.decoder.specializer.close()
            raise
        return cls(loaded, engine, listeners)

    @staticmethod
    def _check_logits(loaded) -> None:
        import numpy as np

        dec = loaded.decoder
        token = loaded.tokenizer.bos_id if getattr(loaded.tokenizer, "bos_id", None) is not None else 1
        dec.add_sequence(0)
        try:
            logits = dec.prefill([0], [[int(token)]])
        finally:
            dec.remove_sequence(0)
        if not np.isfinite(logits).all():
            raise ArtifactError("the logits are not finite on a smoke prompt")

    def smoke_check(self) -> None:
        """The load check: one token through the engine (the daemon's other loads run one inference)."""
        from edge.generate.sampler import SamplingParams

        h = self.engine.submit([self._smoke_token()], SamplingParams(max_tokens=1, ignore_eos=True), timeout_s=120)
        for _ in h:
            pass
        if h.stats.completion_tokens != 1:
            raise ArtifactError(f"generating one token failed (finish reason '{h.stats.finish_reason}')")

    def _smoke_token(self) -> int:
        bos = getattr(self.loaded.tokenizer, "bos_id", None)
        return int(bos) if bos is not None else 1

    @property
    def specializer(self):
        return self.loaded.decoder.specializer

    @property
    def context(self) -> int:
        return self.loaded.decoder.context

    def stats(self) -> dict:
        return self.engine.stats()

    def gauges(self) -> dict:
        """What telemetry samples: requests queued, sequences running, KV cache bytes in use and, when
        the engine has a prefix cache, its cumulative hits and lookups."""
        from edge.generate.decoder import kv_bytes_per_token

        st = self.engine.stats()
        out = {"queued": st["queued"], "running": st["running"],
               "kv_bytes": st.get("kv_bytes_in_use", st["kv_tokens_in_use"] * kv_bytes_per_token(self.loaded.config))}
        for k in ("prefix_hits", "prefix_lookups"):
            if k in st:
                out[k] = int(st[k])
        return out

    def account(self, stats, timing: "Timing | None" = None) -> None:
        """A request ended (its GenerationStats, with ttft_s and decode_s as `timing` measured them):
        tell the listeners (metrics, telemetry)."""
        import dataclasses

        if timing is not None:
            ttft_s, decode_s = timing.result(stats)
            stats = dataclasses.replace(stats, ttft_s=ttft_s, decode_s=decode_s)
        for listener in self.listeners:
            on_generation = getattr(listener, "on_generation", None)
            if on_generation is not None:
                on_generation(self.name, stats)

    def close(self) -> None:
        self.engine.close()
        if self.specializer is not None:
            self.specializer.close()

    # -- requests ----------------------------------------------------------------------------
    def chat_prompt(self, doc: dict) -> list[int]:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"}", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
            role, content = m["role"], m.get("content")
            if role == "developer":
                role = "system"  # OpenAI's newer name for the system role
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
                    texts.append(part["text"])
                content = "".join(texts)
            elif content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] needs a string 'content'", param=f"messages[{i}].content")
            _check_utf8(content, f"messages[{i}].content")
            clean.append({"role": role, "content": content})
        try:
            text = self.loaded.template.render(clean, add_generation_prompt=True)
        except EdgeJitError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.loaded.tokenizer.encode(text)

    def completion_prompt(self, doc: dict) -> list[int]:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            _check_utf8(prompt, "prompt")
            if not prompt:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            return self.loaded.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.loaded.config["vocab_size"]
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"'prompt' has a token id outside the vocabulary (0..{vocab - 1})", param="prompt")
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string (or a list of token ids); one prompt per request", param="prompt")

    def check_length(self, prompt_ids: list[int], param: str) -> None:
        if len(prompt_ids) >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the {param} is "
                                f"{len(prompt_ids)} tokens (leave room for the reply).", param=param,
                           code="context_length_exceeded")


class Timing:
    """A request's clock as its client sees it: time to first token from the request's arrival (its
    body read; prompt preparation and queueing included) to the first text written to the client,
    decode time from the first to the last text written. A non-streamed reply (nothing written
    before the end) falls back to the engine's first and last token."""

    def __init__(self):
        self.received = time.perf_counter()
        self.submitted = self.received
        self.first_out = self.last_out = 0.0

    def submit(self) -> None:
        self.submitted = time.perf_counter()

    def sent(self) -> None:
        """Generated text was just written to the client."""
        self.last_out = time.perf_counter()
        if not self.first_out:
            self.first_out = self.last_out

    def result(self, stats) -> tuple[float, float]:
        """(ttft_s, decode_s)."""
        if self.first_out:
            return self.first_out - self.received, self.last_out - self.first_out
        return self.submitted - self.received + stats.ttft_s, stats.decode_s


def _check_utf8(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid UTF-8", param=param) from None


def _number(doc: dict, key: str, default, lo=None, hi=None, *, integer=False, lo_open=False):
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'} (got {json.dumps(v)[:40]})", param=key)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ApiError(400, f"'{key}' must be in {bounds} (got {v})", param=key)
    return v


# Parameters a client may send that this server cannot honour: a 400 unless they are left at
# their "off" value (an app that sends them expecting an effect should know).
_UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


def sampling_params(doc: dict, prompt_len: int, context: int, *, chat: bool):
    """SamplingParams from an OpenAI request (plus the extensions top_k, min_p,
    repetition_penalty, ignore_eos); raises ApiError(400) naming the field."""
    from edge.generate.sampler import SamplingParams

    for key, off in _UNSUPPORTED.items():
        if key in doc and doc[key] not in off and not (key == "logprobs" and not chat and doc[key] == 0):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)
    rf = doc.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported", param="response_format")
    n = doc.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported (one choice per request)", param="n")
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        if doc.get(key) is not None:
            max_tokens = _number(doc, key, None, 1, integer=True)
            break
    room = context - prompt_len  # the reply ends at the context (finish_reason "length")
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    stop = doc.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", param="ignore_eos")
    params = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(_number(doc, "temperature", 1.0, 0, 2)),
        top_p=float(_number(doc, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=int(_number(doc, "top_k", 0, 0, integer=True)),
        min_p=float(_number(doc, "min_p", 0.0, 0, 1)),
        repetition_penalty=float(_number(doc, "repetition_penalty", 1.0, 0, lo_open=True)),
        seed=seed if seed is None else int(seed) % 2**64,
        stop=stop,
        ignore_eos=ignore_eos,
    )
    if params.min_p >= 1:
        raise ApiError(400, "'min_p' must be in [0, 1)", param="min_p")
    try:
        params.check()
    except EdgeJitError as e:
        raise ApiError(400, str(e)) from None
    return params


def stream_options(doc: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = doc.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be {\"include_usage\": true|false}", param="stream_options")
    return True, bool(opts.get("include_usage", False))


class Reply:
    """The response documents of one request: the final one, or the stream's chunks."""

    def __init__(self, chat: bool, model: str, version: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"edgejit-{version}"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def usage(stats) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                "total_tokens": stats.prompt_tokens + stats.completion_tokens}

    def final(self, text: str, finish_reason: str, stats) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            doc = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            doc = self._head("text_completion")
        return {**doc, "choices": [choice], "usage": self.usage(stats)}

    def chunk(self, *, content: str | None = None, role: bool = False, finish_reason: str | None = None,
              include_usage: bool = False) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            doc = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
            doc = self._head("text_completion")
        doc["choices"] = [choice]
        if include_usage:
            doc["usage"] = None
        return doc

    def usage_chunk(self, stats) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(stats)}
