"""Benchmark: choosing a token from the logits (edge/generate/sampler.py) against the same filters
computed over the whole vocabulary with a full sort and `numpy.random.Generator.choice` (what the
sampler did before, and the oracle tests/edge/generate/test_sampling.py holds it to: the same
choices for the same seed).

    python bench/bench_sampling.py          # writes bench/results/sampling.md

SmolLM2's vocabulary (49,152 tokens), logits with the spread of a real model's (normal, sigma 3),
one thread, per token: the median of 5 interleaved rounds, each the median of 40 draws; the decode step it follows costs
~4 ms (bench/results/generate.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 49152
SETTINGS = ({"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_k": 40},
            {"temperature": 0.8, "top_p": 0.95, "min_p": 0.05}, {"temperature": 0.0})


def full_vocabulary_sample(logits, rng, temperature, top_k=0, top_p=1.0, min_p=0.0) -> int:
    """The filters over the whole vocabulary with a full sort, then Generator.choice."""
    if temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    if top_k and top_k < x.shape[0]:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if min_p > 0:
        probs = np.where(probs < min_p * probs.max(), 0.0, probs)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[cum - probs[order] < top_p * cum[-1]]] = True
        probs = np.where(mask, probs, 0.0)
    return int(rng.choice(probs.shape[0], p=probs / probs.sum()))


def main() -> int:
    from bench.common import median_ms, write_results
    from edge.generate.sampler import Sampler, SamplingParams

    logits = (np.random.default_rng(0).standard_normal(VOCAB) * 3).astype(np.float32)
    rows = []
    for kw in SETTINGS:
        ours, rng = Sampler(SamplingParams(seed=1, **kw)), np.random.default_rng(1)
        a, b = [], []
        for _ in range(5):  # interleaved rounds
            a.append(median_ms(lambda: ours(logits), 40))
            b.append(median_ms(lambda: full_vocabulary_sample(logits, rng, **kw), 40))
        name = ", ".join(f"{k} {v}" for k, v in kw.items())
        rows.append(f"| {name} | {np.median(a):.3f} | {np.median(b):.3f} | {np.median(b) / np.median(a):.1f}x |")
    body = "\n".join([
        f"Choosing one token from {VOCAB:,} logits (normal, sigma 3), one thread, ms per token (median of 5 "
        "interleaved rounds of medians of 40). edgejit: `edge.generate.sampler.Sampler` (filters over the "
        "candidates they can keep: the top-k ids; for top_p the tokens above a weight floor that holds the mass, sorted). Full vocabulary: the same filters "
        "over every token with a full sort for top_p, then `Generator.choice` (the sampler before; the tests "
        "hold the two to the same choices for the same seed).", "",
        "| sampling | edgejit ms | full vocabulary ms | speed-up |", "|---|---|---|---|", *rows])
    write_results(Path(__file__).parent / "results" / "sampling.md", "Sampling: a token from the logits", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
