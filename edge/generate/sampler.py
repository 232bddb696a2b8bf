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
    """Draws from the filtered distribution by inverting its cumulative sum with one uniform draw
    (as `numpy.random.Generator.choice(p=...)` does), computing only what that needs: the filters
    over the tokens they can keep (the top-k ids; for top_p the tokens above a weight floor that
    holds the mass, sorted), the weights in one fp32 array (temporaries of the vocabulary's size
    and fp64 exp cost more than the rest), and the cumulative sum in two levels (blocks of BLOCK
    tokens, then within the chosen block). bench/bench_sampling.py times it against the plain
    computation over the whole vocabulary; the tests hold the two to the same choices for the same
    seed (but for a draw that lands within fp32 rounding of a boundary)."""

    NUCLEUS_FLOORS = (1e-2, 1e-4, 1e-6, 0.0)  # top_p: candidate weights (relative to the top), tried in turn
    BLOCK = 256  # tokens per block of the two-level cumulative sum

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
        ids = None  # candidate token ids in increasing order (None: all of them)
        if p.top_k and p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            ids = np.flatnonzero(x >= kth)  # ties with the k-th stay in, as transformers' warper
        w = x - x.max() if ids is None else x[ids] - x[ids].max()  # one new array, then in place
        w *= np.float32(1 / p.temperature)
        np.exp(w, out=w)  # the largest is 1
        if p.min_p > 0:
            w = np.where(w < np.float32(p.min_p), np.float32(0), w)
        if p.top_p < 1.0:
            w = self._nucleus(w, p.top_p)
        j = self._draw(w)
        return int(j if ids is None else ids[j])

    def _draw(self, w: np.ndarray) -> int:
        """The first index whose cumulative weight exceeds a uniform draw of the total: never a
        zero-weight one."""
        n, b = w.shape[0], self.BLOCK
        blocks = np.add.reduceat(w, np.arange(0, n, b), dtype=np.float64)
        cum = np.cumsum(blocks)
        u = self.rng.random() * cum[-1]
        i = min(int(cum.searchsorted(u, side="right")), len(cum) - 1)
        while blocks[i] == 0:  # u rounded past the last block with weight
            i -= 1
        inner = np.cumsum(w[i * b:(i + 1) * b], dtype=np.float64)
        k = min(int(inner.searchsorted(u - (cum[i - 1] if i else 0.0), side="right")), len(inner) - 1)
        while w[i * b + k] == 0:
            k -= 1
        return i * b + k

    def _nucleus(self, w: np.ndarray, top_p: float) -> np.ndarray:
        """w with all but the smallest most-probable prefix reaching top_p of its mass set to 0
        (ties in stable order: lower ids first), sorting only the tokens above the largest
        threshold (relative to the top weight, 1) whose tokens hold that mass: the prefix is
        among them."""
        total = w.sum(dtype=np.float64)
        for floor in self.NUCLEUS_FLOORS:
            cand = np.flatnonzero(w >= floor) if floor > 0 else np.flatnonzero(w)
            if floor == 0 or w[cand].sum(dtype=np.float64) >= top_p * total:
                break
        order = cand[np.argsort(-w[cand], kind="stable")]
        cum = np.cumsum(w[order], dtype=np.float64)
        keep = order[cum - w[order] < top_p * total]
        out = np.zeros_like(w)
        out[keep] = w[keep]
        return out
