"""The generation engine: continuous batching over one KV cache. Requests submitted at different
times, with different prompt lengths, decoded together, each get exactly the reply they get alone
(greedy); a request joins the running batch at the next step; a long prompt is prefilled in chunks
between decode steps; cancelled and timed-out requests free their KV; a full queue says so."""

from __future__ import annotations

import threading
import time

import pytest

from edge.generate import SamplingParams
from edge.generate.engine import Engine, QueueFull

PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [1604, 3987, 46477, 24, 94, 727],
    [1, 4093, 198, 1780, 314, 260, 31469, 6740, 281, 260, 905, 47, 2, 198, 1, 520, 9531, 198],
    [504, 3575, 282] * 30,  # longer than the engine's prefill chunk below
]


@pytest.fixture(scope="module")
def model(tiny_llamas):
    from edge.generate.loader import load_decoder

    _, art = tiny_llamas["gqa_tied"]
    return load_decoder(art, context=256, max_batch=4)


def _alone(model, prompt, n):
    engine = Engine(model)
    try:
        h = engine.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        text = "".join(h)
        return h.stats.tokens, text
    finally:
        engine.close()


def test_concurrent_requests_get_their_own_replies(model):
    want = [_alone(model, p, 20) for p in PROMPTS]
    engine = Engine(model, prefill_chunk=32)
    try:
        results = [None] * len(PROMPTS)

        def client(i):
            time.sleep(0.05 * i)  # arrive while the others are decoding
            h = engine.submit(PROMPTS[i], SamplingParams(max_tokens=20, ignore_eos=True))
            results[i] = (h.stats.tokens, "".join(h))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == want
        st = engine.stats()
        assert st["running"] == 0 and st["kv_tokens_in_use"] == 0 and st["finished"] == len(PROMPTS)
    finally:
        engine.close()


def test_a_new_request_joins_the_running_batch(model):
    """While a long reply streams, a second request is admitted and finishes first."""
    engine = Engine(model)
    try:
        long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        it = iter(long)
        next(it)  # the long request is decoding
        short = engine.submit(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))
        "".join(short)
        assert short.done and not long.done
        rest = "".join(it)
        assert long.stats.completion_tokens == 200 and rest
    finally:
        engine.close()


def test_cancel_and_timeout_free_the_kv(model):
    engine = Engine(model)
    try:
        h = engine.submit(PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True))
        it = iter(h)
        next(it)
        h.cancel()
        list(it)
        assert h.stats.finish_reason == "cancelled"
        slow = engine.submit(PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True), timeout_s=0.05)
        with pytest.raises(Exception, match="timed out"):
            "".join(slow)
        deadline = time.time() + 10
        while engine.stats()["kv_tokens_in_use"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["kv_tokens_in_use"] == 0 and engine.stats()["running"] == 0
        # a reader that walks away: the request is cancelled when its iterator is closed
        h = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        it = iter(h)
        next(it)
        it.close()
        deadline = time.time() + 10
        while not h.done and time.time() < deadline:
            time.sleep(0.01)
        assert h.stats.finish_reason == "cancelled"
    finally:
        engine.close()


def test_queue_limit_and_bad_requests(model):
    engine = Engine(model, max_queue=2)
    try:
        with pytest.raises(Exception, match="empty prompt"):
            engine.submit([], SamplingParams())
        with pytest.raises(Exception, match="context is 256"):
            engine.submit([5] * 300, SamplingParams())
        with pytest.raises(Exception, match="outside the vocabulary"):
            engine.submit([10**9], SamplingParams())
        handles = []
        with pytest.raises(QueueFull):
            for _ in range(20):  # 4 slots + 2 queued, then full (long replies: none finishes meanwhile)
                handles.append(engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True)))
        for h in handles:
            h.cancel()
    finally:
        engine.close()


def test_a_burst_fills_the_free_slots_before_the_queue(model):
    """Requests submitted faster than the loop admits them take the free sequence slots first:
    max_seqs + max_queue are accepted at once, the next one is QueueFull."""
    engine = Engine(model, max_queue=1)
    try:
        handles = [engine.submit(PROMPTS[i % 3], SamplingParams(max_tokens=200, ignore_eos=True)) for i in range(5)]
        with pytest.raises(QueueFull):
            engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        for h in handles:
            h.cancel()
    finally:
        engine.close()
