"""Text generation for one caller: `Generator(artifact).chat(messages)` and `.complete(prompt)`
yield the reply as text pieces while it is generated (over the same engine the server batches
many callers with: edge/generate/engine.py)."""

from __future__ import annotations

from typing import Iterator

from edge.errors import EdgeJitError
from edge.generate.engine import DEFAULT_PREFIX_CACHE_TOKENS, Engine, GenerationStats
from edge.generate.sampler import SamplingParams


def check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise EdgeJitError(f"the {what} must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (e.g. from argv)
        raise EdgeJitError(f"the {what} is not valid UTF-8") from None


class Generator:
    """Generation from a decoder artifact. Generations started from several threads are queued
    and decoded together, up to `max_batch` at a time. The prefix cache keeps the KV of up to
    `prefix_cache_tokens` tokens of finished generations (0: off), so that the next turn of a chat
    prefills only what is new."""

    def __init__(self, artifact, *, context: int | None = None, threads: int | None = None, max_batch: int = 1, trust=None,
                 jit=None, cache_dir=None, state_dir=None, listeners=(), prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS):
        from edge.generate.loader import load_decoder

        self.model = load_decoder(artifact, context=context, threads=threads, max_batch=max_batch, trust=trust,
                                  jit=jit, cache_dir=cache_dir, state_dir=state_dir, listeners=listeners,
                                  extra_kv_tokens=prefix_cache_tokens)
        self.engine = Engine(self.model, prefix_cache_tokens=prefix_cache_tokens)
        self.tokenizer = self.model.tokenizer
        self.template = self.model.template
        self.stats = GenerationStats()  # of the last generation started

    def close(self) -> None:
        """Stop the engine and the JIT (if any; its shape profile is saved)."""
        self.engine.close()
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
        """Validate now (errors raise before the first piece), then stream the reply's text."""
        handle = self.engine.submit(list(prompt_ids), SamplingParams(**sampling))
        self.stats = handle.stats
        return iter(handle)
