"""Choosing tokens (edge/generate/sampler.py) and cutting at stop strings (engine.StopMatcher),
without a model: greedy, seeds, top-k / top-p / min-p supports (against transformers' warpers),
temperature on frequencies, repetition penalty (against transformers' processor), bad values."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_sampling import full_vocabulary_sample
from edge.errors import EdgeJitError
from edge.generate.engine import StopMatcher as _StopMatcher
from edge.generate.sampler import Sampler, SamplingParams, apply_repetition_penalty

# token -> probability, shuffled so that no filter can get away with looking at ids in order
PROBS = {3: 0.40, 0: 0.25, 5: 0.15, 1: 0.10, 4: 0.06, 2: 0.04}
LOGITS = np.log(np.array([PROBS[i] for i in range(len(PROBS))], dtype=np.float32)) + 3.0  # any offset


def _sampler(**kw) -> Sampler:
    return Sampler(SamplingParams(**kw).check())


def _draws(n: int, logits=LOGITS, **kw) -> np.ndarray:
    s = _sampler(seed=kw.pop("seed", 0), **kw)
    return np.array([s(logits) for _ in range(n)])


def _hf_support(warper, logits) -> set[int]:
    import torch

    out = warper(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits, dtype=torch.float32)[None])
    return set(np.flatnonzero(np.isfinite(out[0].numpy())).tolist())


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = _sampler()  # temperature 0 is the default
    for _ in range(200):
        x = rng.normal(0, 3, 1000).astype(np.float32)
        assert s(x) == int(np.argmax(x))
    x = np.array([1.0, 5.0, 5.0, -2.0], np.float32)
    assert s(x) == 1  # a tie: the first, as argmax


def test_same_seed_same_choices():
    rng = np.random.default_rng(1)
    steps = [rng.normal(0, 2, 500).astype(np.float32) for _ in range(300)]
    kw = dict(temperature=0.9, top_p=0.95, top_k=50, min_p=0.01)
    runs = [[_sampler(seed=seed, **kw)(x) for x in steps] for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len(set(runs[0])) > 50  # it really sampled


@pytest.mark.parametrize("temperature", [1e-4, 0.3, 1.0, 2.0, 50.0, 1e4])
def test_top_k_1_is_greedy(temperature):
    rng = np.random.default_rng(2)
    s = _sampler(temperature=temperature, top_k=1, seed=3)
    for _ in range(200):
        x = rng.normal(0, 3, 300).astype(np.float32)
        assert s(x) == int(np.argmax(x))


@pytest.mark.parametrize("option, value, allowed", [
    ("top_k", 1, {3}), ("top_k", 3, {3, 0, 5}), ("top_k", 5, {3, 0, 5, 1, 4}),
    ("top_p", 0.3, {3}), ("top_p", 0.5, {3, 0}), ("top_p", 0.7, {3, 0, 5}), ("top_p", 0.85, {3, 0, 5, 1}),
    ("min_p", 0.5, {3, 0}), ("min_p", 0.3, {3, 0, 5}), ("min_p", 0.2, {3, 0, 5, 1}), ("min_p", 0.12, {3, 0, 5, 1, 4}),
])
def test_filters_never_choose_an_excluded_token(option, value, allowed):
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warper = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}[option](value)
    assert _hf_support(warper, LOGITS) == allowed  # the expectation is transformers' too
    chosen = _draws(3000, temperature=1.0, **{option: value})
    assert set(chosen.tolist()) == allowed  # never outside; every allowed token turns up
    # what is kept keeps its relative probabilities
    kept = sum(PROBS[i] for i in allowed)
    for i in allowed:
        assert abs((chosen == i).mean() - PROBS[i] / kept) < 0.04, (i, (chosen == i).mean())


def test_filters_combined_stay_inside_each():
    rng = np.random.default_rng(4)
    for seed in range(20):
        x = rng.normal(0, 2, 200).astype(np.float32)
        probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        top4 = set(np.argsort(-x)[:4].tolist())
        above = set(np.flatnonzero(probs >= 0.2 * probs.max()).tolist())
        chosen = set(_draws(200, x, temperature=1.0, top_k=4, min_p=0.2, top_p=0.9, seed=seed).tolist())
        assert chosen <= top4 & above


def _chi2(counts: np.ndarray, expected_p: np.ndarray) -> float:
    exp = expected_p * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_shapes_frequencies(temperature):
    p = np.array([0.6, 0.3, 0.1])
    logits = np.log(p).astype(np.float32)
    chosen = _draws(4000, logits, temperature=temperature, seed=11)
    counts = np.bincount(chosen, minlength=3)
    want = p ** (1 / temperature)
    want /= want.sum()
    assert _chi2(counts, want) < 13.8, (counts, want)  # chi-square, 2 degrees of freedom, p = 0.001
    if temperature != 1.0:  # and it is not the T = 1 distribution
        assert _chi2(counts, p) > 50, counts


def test_repetition_penalty_as_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(5)
    for penalty in (1.3, 2.0, 0.7):
        x = rng.normal(0, 4, 64).astype(np.float32)
        x[7] = 0.0
        history = [3, 7, 9, 9, 12, 40, 41, 3, 63, 0]
        ours = apply_repetition_penalty(x, history, penalty)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), torch.tensor(x)[None])[0].numpy()
        np.testing.assert_array_equal(ours, theirs)
        assert np.array_equal(np.delete(ours, history), np.delete(x, history))  # the rest untouched
    before = x.copy()
    apply_repetition_penalty(x, history, 2.0)
    assert np.array_equal(x, before)  # the caller's logits are left alone


def test_repetition_penalty_in_the_sampler():
    x = np.array([4.0, 3.0, -1.0, -1.5], np.float32)
    assert _sampler()(x, [0]) == 0
    assert _sampler(repetition_penalty=1.5)(x, [0]) == 1  # 4 / 1.5 < 3
    assert _sampler(repetition_penalty=1.5)(np.array([-3.0, -4.0], np.float32), [0]) == 1  # -3 * 1.5 < -4
    assert _sampler(repetition_penalty=1.5)(x, [99, -1]) == 0  # ids outside the vocabulary are ignored


@pytest.mark.parametrize("kw, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=2.5), "max_tokens must be a positive integer"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(min_p=1.0), "min_p must be in [0, 1)"),
    (dict(min_p=-0.1), "min_p must be in [0, 1)"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0"),
])
def test_bad_values_raise(kw, message):
    with pytest.raises(EdgeJitError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingParams(**kw).check()


# -- stop strings --------------------------------------------------------------------------------
def _feed(stops, pieces):
    m = _StopMatcher(tuple(stops))
    outs, hit = [], False
    for p in pieces:
        out, hit = m.feed(p)
        outs.append(out)
        if hit:
            break
    return outs, hit, m


def test_stop_string_across_pieces():
    outs, hit, _ = _feed(["</s>"], ["Hello <", "/", "s> world"])
    assert outs == ["Hello ", "", ""] and hit
    outs, hit, _ = _feed(["\n\nUser:"], ["Sure.", "\n", "\nUs", "er", ": more"])
    assert "".join(outs) == "Sure." and hit
    outs, hit, _ = _feed(["END", "ND!"], ["xxEND!"])  # the first in the text wins
    assert outs == ["xx"] and hit
    outs, hit, _ = _feed(["stop"], ["no stop", "here"])  # cut inside a piece, the rest dropped
    assert outs == ["no "] and hit


def test_text_that_only_looked_like_a_stop_is_released():
    outs, hit, m = _feed(["</s>"], ["a <", "/", "b"])
    assert outs == ["a ", "", "</b"] and not hit
    outs, hit, m = _feed(["Observation:"], ["Obs", "erva", "tions show"])
    assert outs == ["", "", "Observations show"] and not hit
    outs, hit, m = _feed(["</s>"], ["the end <"])  # held at the end of the reply, then flushed
    assert outs == ["the end "] and m.flush() == "<" and not hit


def test_stop_matcher_random():
    """Random text, stop strings (none inside another) and piece boundaries: the output is the text
    cut before the first stop string, and at every step everything is out except the longest tail
    that could still begin a stop string."""
    rng = np.random.default_rng(6)
    alphabet = list("ab c\né")
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, rng.integers(0, 40)))
        stops = set()
        for _ in range(rng.integers(1, 4)):
            stops.add("".join(rng.choice(alphabet, rng.integers(1, 5))))
        stops = [s for s in stops if not any(s != o and s in o for o in stops)]
        cuts = sorted(rng.choice(np.arange(1, len(text)), min(len(text) - 1, rng.integers(0, 8)), replace=False).tolist()) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        found = [text.find(s) for s in stops if s in text]
        m = _StopMatcher(tuple(stops))
        out, seen, hit = "", "", False
        for p in pieces:
            o, hit = m.feed(p)
            out += o
            seen += p
            if hit:
                break
            hold = max((k for s in stops for k in range(1, min(len(s), len(seen) + 1)) if seen.endswith(s[:k])), default=0)
            assert out == seen[: len(seen) - hold], (text, stops, pieces)
        if found:
            assert hit and out == text[: min(found)], (text, stops, pieces, out)
        else:
            assert not hit and out + m.flush() == text


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.7, top_k=40),
                                dict(temperature=1.3, top_p=0.5, min_p=0.05), dict(temperature=1.0, top_k=50, top_p=0.95),
                                dict(temperature=1.0, top_p=0.99)], ids=str)
@pytest.mark.parametrize("spread", [0.05, 3.0])  # flat (a nucleus of tens of thousands of tokens) and peaked
def test_sampler_draws_what_the_full_vocabulary_computation_draws(kw, spread):
    """The sampler filters only the candidates it needs (for top_p the tokens above a weight floor, the top-k ids),
    and still makes the same choices as the filters over a whole 49,152-token vocabulary with a
    full sort and Generator.choice (bench/bench_sampling.py, which times the two), for the same seed."""
    x = (np.random.default_rng(7).standard_normal(49152) * spread).astype(np.float32)
    ours = _sampler(seed=3, **kw)
    ref_rng = np.random.default_rng(3)
    got = [ours(x) for _ in range(60)]
    want = [full_vocabulary_sample(x, ref_rng, **kw) for _ in range(60)]
    # fp32 weights and a two-level cumulative sum: a draw within rounding of a boundary may part
    assert sum(a == b for a, b in zip(got, want)) >= 58, (got, want)
    assert len(set(got)) > 5
