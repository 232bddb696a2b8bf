"""Choosing the next token from fp32 logits: greedy, temperature, top-k, top-p, min-p, repetition
penalty; a seed makes a run repeatable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import EdgeJitError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def check(self) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EdgeJitError(f"max_tokens must be a positive integer (got {self.max_tokens})")
        if not self.temperature >= 0:  # (NaN fails too)
            raise EdgeJitError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise EdgeJitError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise EdgeJitError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p < 1:
            raise EdgeJitError(f"min_p must be in [0, 1) (got {self.min_p})")
        if not 0 < self.repetition_penalty < float("inf"):
            raise EdgeJitError(f"repetition_penalty must be > 0 and finite (got {self.repetition_penalty})")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        return self


def apply_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """A copy of `logits` with every token of `history` made less likely, as transformers does
    (RepetitionPenaltyLogitsProcessor): a positive logit is divided by the penalty, a negative
    one multiplied."""
    x = np.array(logits, dtype=np.float32)
    seen = np.unique(np.asarray(history, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < x.shape[0])]
    vals = x[seen]
    x[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return x


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        p = self.p
        x = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and history:
            x = apply_repetition_penalty(x, history, p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(x))
        x = x.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.min_p > 0:
            probs = np.where(probs < p.min_p * probs.max(), 0.0, probs)
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < p.top_p * cum[-1]  # smallest prefix reaching top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
