"""Text generation for one caller at a time: `Generator(artifact).chat(messages)` and
`.complete(prompt)` yield the reply as text pieces while it is generated."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

from edge.errors import EdgeJitError

from edge.generate.sampler import Sampler, SamplingParams
from edge.generate.tokenizer import StreamDecoder


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first token out
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or a stop string), "length" (max_tokens or context), "cancelled"
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1  # the first token comes from prefill
        return n / self.decode_s if n > 0 and self.decode_s else 0.0


def check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise EdgeJitError(f"the {what} must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. from argv)
        raise EdgeJitError(f"the {what} is not valid UTF-8") from None


class _StopMatcher:
    """Holds back text that could still become a stop string; cuts at the first one found."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            pos = min(h[0] for h in hits)
            out, self.pending = self.pending[:pos], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generator:
    """Generation from a decoder artifact. Not thread-safe: one generation at a time (the
    serving engine batches many callers over the same pieces)."""

    def __init__(self, artifact, *, context: int | None = None, threads: int | None = None, max_batch: int = 1, trust=None,
                 jit=None, cache_dir=None, state_dir=None, listeners=()):
        from edge.generate.loader import load_decoder

        self.model = load_decoder(artifact, context=context, threads=threads, max_batch=max_batch, trust=trust,
                                  jit=jit, cache_dir=cache_dir, state_dir=state_dir, listeners=listeners)
        self.tokenizer = self.model.tokenizer
        self.template = self.model.template
        self.stats = GenerationStats()
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the JIT (if any) and save its shape profile."""
        if self.model.decoder.specializer is not None:
            self.model.decoder.specializer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def context(self) -> int:
        return self.model.decoder.context

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        for m in messages:
            check_text(m.get("content") if isinstance(m, dict) else None, "message content")
        return self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True))

    def chat(self, messages: list[dict], **sampling) -> Iterator[str]:
        return self.generate(self.chat_prompt(messages), **sampling)

    def complete(self, prompt: str, **sampling) -> Iterator[str]:
        check_text(prompt, "prompt")
        return self.generate(self.tokenizer.encode(prompt), **sampling)

    def generate(self, prompt_ids: list[int], **sampling) -> Iterator[str]:
        """Validate now (errors raise before the first piece), then stream."""
        params = SamplingParams(**sampling).check()
        if not prompt_ids:
            raise EdgeJitError("empty prompt")
        if len(prompt_ids) >= self.context:
            raise EdgeJitError(f"the prompt is {len(prompt_ids)} tokens; the context is {self.context} (leave room for the reply)")
        vocab = self.model.config["vocab_size"]
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EdgeJitError(f"token id outside the vocabulary (0..{vocab - 1})")
        return self._stream(list(prompt_ids), params)

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        dec = self.model.decoder
        stop_ids = set() if params.ignore_eos else set(self.model.stop_ids)
        sampler = Sampler(params)
        stream = StreamDecoder(self.tokenizer, prompt_ids)
        stops = _StopMatcher(params.stop)
        st = self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        # A generation whose cleanup was itself interrupted (a second Ctrl-C) left its sequence
        # in the KV cache: generations here run one at a time, so whatever is left is stale.
        for old in list(dec.lengths):
            dec.remove_sequence(old)
        sid = next(self._ids)
        history = list(prompt_ids)
        stopped = False  # by a stop string
        t1 = None
        try:
            dec.add_sequence(sid)
            t0 = time.perf_counter()
            logits = dec.prefill([sid], [prompt_ids])[0]
            token = sampler(logits, history)
            st.prefill_s = st.ttft_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            while True:
                if token in stop_ids:
                    st.finish_reason = "stop"
                    break
                st.tokens.append(token)
                history.append(token)
                st.completion_tokens += 1
                text, stopped = stops.feed(stream.push(token))
                if text:
                    yield text
                if stopped:
                    st.finish_reason = "stop"
                    break
                if st.completion_tokens >= params.max_tokens or dec.lengths[sid] + 1 >= self.context:
                    st.finish_reason = "length"
                    break
                logits = dec.decode([sid], [token])[0]
                token = sampler(logits, history)
            st.decode_s = time.perf_counter() - t1
            if not stopped:
                tail, hit = stops.feed(stream.flush())
                if not hit:
                    tail += stops.flush()
                if tail:
                    yield tail
        finally:
            if not st.finish_reason:  # Ctrl-C, or the caller closed the stream
                st.finish_reason = "cancelled"
                if t1 is not None:
                    st.decode_s = time.perf_counter() - t1
            dec.remove_sequence(sid)
