"""The prefix cache and the KV memory cap (edge/generate/prefix_cache.py, engine.py).

Greedy replies with the prefix cache equal replies without it, token for token: prompts sharing a
system prompt (one after another and at once) and a conversation continued turn by turn, on a tiny
random-weight llama and on SmolLM2; the cache stays within its token budget (LRU eviction); a KV
memory cap smaller than the batch needs makes requests wait in the queue instead of failing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge.generate import SamplingParams
from edge.generate.engine import Engine
from edge.generate.prefix_cache import MIN_MATCH, PrefixCache


def _real_texts(n: int, seed: int) -> list[str]:
    from deploy.tools.corpus import sentences

    texts = [t for t in sentences() if 60 <= len(t) <= 400]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), n, replace=False)]


def _chat_prompts(model, system: str, questions: list[str]) -> list[list[int]]:
    return [model.tokenizer.encode(model.template.render(
        [{"role": "system", "content": system}, {"role": "user", "content": q}], add_generation_prompt=True))
        for q in questions]


def _run(engine, prompt, n):
    h = engine.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    text = "".join(h)
    return h.stats.tokens, text, h.stats


def _alone(model, prompts, n):
    """Each prompt on a fresh engine without the prefix cache: the reference."""
    out = []
    for p in prompts:
        engine = Engine(model, prefix_cache_tokens=0)
        try:
            out.append(_run(engine, p, n)[:2])
        finally:
            engine.close()
    return out


# -- the book, without a model ------------------------------------------------------------------
def test_match_add_evict():
    c = PrefixCache(100, max_entries=3)
    a = list(range(1, 41))
    assert c.add(1, a) == [] and c.tokens == 40
    m = c.match(a + [99])
    assert m.entry.seq_id == 1 and m.length == 40 and m.take_over
    m = c.match(a)  # the last prompt token is always computed
    assert m.length == 39
    m = c.match(a[:20] + [7] * 10)
    assert m.length == 20 and not m.take_over
    assert c.match(a[: MIN_MATCH - 1] + [0]) is None  # too short to be worth it
    assert c.add(2, [5] * 3) == [2]  # too short to keep
    assert c.add(3, a + [7] * 10) == [1]  # 1 is a prefix of 3: redundant
    assert c.add(4, list(range(200, 250))) == []
    assert c.tokens == 100
    c.count(c.match(a + [7] * 11))  # 3 is now the most recently used
    assert c.add(5, list(range(300, 320))) == [4]  # over the budget: 4 (least recently used) goes
    assert c.tokens <= 100 and len(c) == 2
    assert c.add(6, list(range(400, 600))) == [6]  # larger than the whole budget
    assert sorted(c.clear()) == [3, 5] and c.tokens == 0


# -- the engine on a tiny random-weight llama ------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_llamas):
    from edge.generate.loader import load_decoder

    _, art = tiny_llamas["gqa_tied"]
    return load_decoder(art, context=256, max_batch=4, extra_kv_tokens=1024)


def test_shared_system_prompt_same_replies(model):
    system, *questions = _real_texts(6, seed=1)
    prompts = _chat_prompts(model, system, questions)
    sys_len = len(_chat_prompts(model, system, [""])[0]) - 8  # roughly the tokens before the question
    want = _alone(model, prompts, 16)
    engine = Engine(model, prefill_chunk=48)
    try:
        assert [_run(engine, p, 16)[:2] for p in prompts] == want  # one after another
        st = engine.stats()
        assert st["prefix_hits"] >= len(prompts) - 1 and st["prefix_tokens_reused"] >= (len(prompts) - 1) * sys_len
        results = [None] * len(prompts)

        def client(i):
            results[i] = _run(engine, prompts[i], 16)[:2]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == want  # at once: forks of one retained sequence decoded together
        st = engine.stats()
        assert st["running"] == 0 and st["kv_tokens_in_use"] == 0
        assert 0 < st["prefix_cached_tokens"] <= st["prefix_cache_tokens"]
        assert st["kv_bytes_in_use"] <= st["kv_bytes_limit"]
    finally:
        engine.close()
    assert not model.decoder.lengths  # a closed engine leaves the KV cache empty


def test_conversation_turn_by_turn_same_replies(model):
    system, *turns = _real_texts(4, seed=2)

    def converse(engine):
        messages, replies, reused = [{"role": "system", "content": system}], [], []
        for q in turns:
            messages.append({"role": "user", "content": q})
            prompt = model.tokenizer.encode(model.template.render(messages, add_generation_prompt=True))
            tokens, text, stats = _run(engine, prompt, 12)
            replies.append(tokens)
            reused.append((stats.cached_tokens, len(prompt)))
            messages.append({"role": "assistant", "content": text})
        return replies, reused

    plain = Engine(model, prefix_cache_tokens=0)
    try:
        want, _ = converse(plain)
    finally:
        plain.close()
    engine = Engine(model)
    try:
        got, reused = converse(engine)
    finally:
        engine.close()
    assert got == want
    assert reused[0][0] == 0
    for (cached, n), (_, prev_n) in zip(reused[1:], reused):
        assert cached >= prev_n  # at least the whole previous prompt came from the cache


def test_the_cache_stays_within_its_budget(model):
    texts = _real_texts(32, seed=3)
    prompts = [model.tokenizer.encode(" ".join(texts[i: i + 4]))[:60] for i in range(0, 32, 4)]
    assert all(len(p) == 60 for p in prompts)
    budget = 150  # about two retained sequences of 60 + 10
    engine = Engine(model, prefix_cache_tokens=budget)
    try:
        for i, p in enumerate(prompts):
            _run(engine, p, 10)
            st = engine.stats()
            assert st["prefix_cached_tokens"] <= budget and st["prefix_entries"] <= 2
            # the pages really held: the retained sequences and nothing else
            pages = sum(-(-len(e) // 16) for e in engine.cache)
            assert st["kv_bytes_in_use"] == pages * model.decoder.page_bytes
        # the most recent ones are kept: asking again for the last prompt is a hit
        _, _, stats = _run(engine, prompts[-1] + [504], 4)
        assert stats.cached_tokens == len(prompts[-1])
        _, _, stats = _run(engine, prompts[0] + [504], 4)
        assert stats.cached_tokens == 0  # evicted long ago
    finally:
        engine.close()


def test_kv_memory_cap_queues_instead_of_failing(tiny_llamas):
    """A KV cache of one context (256 tokens = 16 pages) and 4 sequence slots: requests needing
    8 pages each run two at a time, the others wait in the queue, and all get their replies."""
    from edge.generate.decoder import kv_bytes_per_token
    from edge.generate.loader import load_decoder, open_decoder_artifact

    _, art = tiny_llamas["gqa_tied"]
    per_token = kv_bytes_per_token(open_decoder_artifact(art).manifest.decoder.config)
    small = load_decoder(art, context=256, max_batch=4, kv_bytes=256 * per_token)
    prompts = [model_ids[:40] for model_ids in (small.tokenizer.encode(t) for t in _real_texts(4, seed=4))]
    want = _alone(small, prompts, 80)
    engine = Engine(small, prefix_cache_tokens=0)
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=80, ignore_eos=True)) for p in prompts]
        seen = []
        while not all(h.done for h in handles):
            st = engine.stats()
            seen.append(st["running"])
            assert st["kv_bytes_in_use"] <= st["kv_bytes_limit"]
            threading.Event().wait(0.005)
        got = [(h.stats.tokens, "".join(h)) for h in handles]
        assert got == want and max(seen) == 2
        assert all(h.stats.finish_reason == "length" for h in handles)
    finally:
        engine.close()
    with pytest.raises(Exception, match="cannot hold one sequence"):
        load_decoder(art, context=256, kv_bytes=100 * per_token)


# -- the real SmolLM2 ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_shared_system_prompt(smollm2_artifact):
    from edge.generate.loader import load_decoder

    loaded = load_decoder(smollm2_artifact, context=1024, max_batch=4, extra_kv_tokens=2048)
    system, *questions = _real_texts(4, seed=5)
    prompts = _chat_prompts(loaded, system * 2, questions)
    want = _alone(loaded, prompts, 24)
    engine = Engine(loaded)
    try:
        first = _run(engine, prompts[0], 24)
        results = [None] * (len(prompts) - 1)

        def client(i):
            results[i] = _run(engine, prompts[i + 1], 24)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [first[:2]] + [r[:2] for r in results] == want
        assert all(r[2].cached_tokens > 0 for r in results)
    finally:
        engine.close()
