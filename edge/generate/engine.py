"""The generation engine: many requests over one decoder and its KV cache, with continuous batching.

One engine thread runs the loop; callers `submit()` and iterate their handle's text pieces.
Each step it admits queued requests while sequence slots are free, runs at most one prefill chunk
(prompt tokens of one or more requests, ragged, at most `prefill_chunk` tokens) and then one
decode step for every request that is generating, so a new request joins the running batch at
the next step and a long prompt is split instead of freezing everyone's stream. A cancelled or
timed-out request leaves the batch at the next step and its KV pages are freed.

KV memory: the decoder's page pool is shared by the running sequences and the prefix cache's
retained ones (edge/generate/prefix_cache.py). A request is admitted when a sequence slot is free
and the pool can hold its whole prompt + max_tokens on top of what the running requests may still
grow to; otherwise it waits in the queue, after the least recently used retained sequences have
been evicted to make room. A finished sequence is kept for the prefix cache; a new prompt starts
from the retained sequence sharing its longest prefix and prefills only the rest.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from edge.errors import EdgeJitError
from edge.generate.decoder import pages_for
from edge.generate.prefix_cache import PrefixCache
from edge.generate.sampler import Sampler, SamplingParams
from edge.generate.tokenizer import StreamDecoder

log = logging.getLogger("edgejit.generate")

DEFAULT_PREFIX_CACHE_TOKENS = 2048  # KV tokens retained for repeated prefixes (45 KiB each for SmolLM2-135M)


class QueueFull(EdgeJitError):
    """The engine's queue is full: try again later."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    completion_tokens: int = 0
    queued_s: float = 0.0  # submit -> admitted into the batch
    ttft_s: float = 0.0  # submit -> first token
    prefill_s: float = 0.0  # admitted -> first token
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str = ""  # "stop" (EOS / end-of-turn token or a stop string), "length", "cancelled", "timeout", "error"
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1  # the first token comes from prefill
        return n / self.decode_s if n > 0 and self.decode_s else 0.0


class StopMatcher:
    """Holds back text that could still become a stop string; cuts at the first one found."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
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


_END = object()


class Handle:
    """A submitted request: iterate it for text pieces (blocks until each arrives); `stats` is
    final once iteration ends; `cancel()` stops it at the engine's next step."""

    def __init__(self, engine: "Engine", req: "_Request"):
        self._engine, self._req = engine, req

    @property
    def stats(self) -> GenerationStats:
        return self._req.stats

    @property
    def done(self) -> bool:
        return self._req.finished.is_set()

    def cancel(self) -> None:
        self._req.cancelled = True
        self._engine._wake()

    def __iter__(self):
        try:
            while True:
                try:
                    item = self._req.out.get(timeout=0.1)  # a timeout keeps Ctrl-C deliverable
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self._req.finished.is_set():  # the caller stopped reading: free the sequence
                self.cancel()
                self._req.stats.finish_reason = "cancelled"  # the engine confirms at its next step


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    stream: StreamDecoder
    stops: StopMatcher
    deadline: float | None
    submitted: float
    stats: GenerationStats
    out: queue.Queue = field(default_factory=queue.Queue)
    finished: threading.Event = field(default_factory=threading.Event)
    history: list[int] = field(default_factory=list)
    seq: int = 0  # its sequence in the KV cache (a retained one when taken over from the prefix cache)
    reserved: int = 0  # KV pages held for it: its whole prompt + max_tokens
    prefilled: int = 0  # prompt tokens already in the KV cache
    next_token: int | None = None  # sampled, not yet fed to decode
    admitted: float = 0.0
    first_token_at: float = 0.0
    cancelled: bool = False


class Engine:
    """Continuous batching over one decoder (edge.generate.loader.LoadedDecoder)."""

    def __init__(self, model, *, max_queue: int = 64, prefill_chunk: int | None = None, timeout_s: float | None = None,
                 prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS):
        self.model = model
        self.dec = model.decoder
        self.tokenizer = model.tokenizer
        self.max_seqs = self.dec.max_batch
        self.max_queue = int(max_queue)
        self.prefill_chunk = int(prefill_chunk or self.dec.prefill_chunk)
        self.timeout_s = timeout_s
        self.stop_ids = set(model.stop_ids)
        self.cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._reserved = 0  # KV pages reserved by the running requests
        self._pages_in_use = self.dec.pages_in_use()  # read by the loop thread only (stats() reads this copy)
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._queued: list[_Request] = []
        self._running: list[_Request] = []
        self._closed = False
        self.counters = {"submitted": 0, "finished": 0, "rejected": 0, "cancelled": 0, "errors": 0, "steps": 0}
        self._thread = threading.Thread(target=self._loop, name=f"edgejit-engine-{model.name}", daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None) -> Handle:
        """Queue a request (validated here: errors raise before anything is queued)."""
        params.check()
        if not prompt_ids:
            raise EdgeJitError("empty prompt")
        if len(prompt_ids) >= self.dec.context:
            raise EdgeJitError(f"the prompt is {len(prompt_ids)} tokens; the context is {self.dec.context} (leave room for the reply)")
        vocab = self.model.config["vocab_size"]
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EdgeJitError(f"token id outside the vocabulary (0..{vocab - 1})")
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        now = time.perf_counter()
        req = _Request(
            id=next(self._ids), prompt=list(prompt_ids), params=params, sampler=Sampler(params),
            stream=StreamDecoder(self.tokenizer, prompt_ids), stops=StopMatcher(params.stop),
            deadline=now + timeout if timeout else None, submitted=now,
            stats=GenerationStats(prompt_tokens=len(prompt_ids)), history=list(prompt_ids),
        )
        with self._cv:
            if self._closed:
                raise EdgeJitError("the engine is closed")
            # Requests the loop has not admitted yet wait for free sequence slots first: only
            # those beyond the free slots count against the queue.
            free = max(0, self.max_seqs - len(self._running))
            if len(self._queued) >= self.max_queue + free:
                self.counters["rejected"] += 1
                raise QueueFull(f"too many requests waiting ({self.max_queue}); try again shortly")
            self._queued.append(req)
            self.counters["submitted"] += 1
            self._cv.notify()
        return Handle(self, req)

    def stats(self) -> dict:
        """Counters and gauges. kv_tokens_in_use: tokens of the running sequences; kv_bytes_in_use:
        KV pages held by running and retained sequences; prefix_cached_tokens: tokens retained."""
        with self._cv:
            cache = self.cache
            return {
                "running": len(self._running), "queued": len(self._queued), "max_seqs": self.max_seqs,
                "max_queue": self.max_queue, "kv_bytes_total": self.dec.kv_bytes, "kv_bytes_limit": self.dec.kv_bytes,
                "kv_bytes_in_use": self._pages_in_use * self.dec.page_bytes,
                "kv_tokens_in_use": sum(self.dec.lengths[r.seq] for r in self._running), "context": self.dec.context,
                "prefix_cache_tokens": cache.capacity_tokens if cache else 0,
                "prefix_cached_tokens": cache.tokens if cache else 0, "prefix_entries": len(cache) if cache else 0,
                "prefix_lookups": 0, "prefix_hits": 0, "prefix_tokens_reused": 0,
                **(cache.counters if cache else {}), **self.counters,
            }

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        from edge.runtime.module import set_threads

        if self.dec.threads:
            set_threads(self.dec.threads)  # TVM sizes one worker pool per calling thread
        while True:
            with self._cv:
                while not self._closed and not self._queued and not self._running:
                    self._cv.wait()
                if self._closed:
                    pending = self._queued + self._running
                    self._queued, self._running = [], []
                    break
                now = time.perf_counter()
                for req in [r for r in self._queued if r.cancelled or (r.deadline is not None and now > r.deadline)]:
                    self._queued.remove(req)
                    self._finish(req, "cancelled" if req.cancelled else "timeout",
                                 None if req.cancelled else EdgeJitError("the request timed out while queued"))
                # in order: a request waiting for KV memory holds back the ones behind it
                while self._queued and len(self._running) < self.max_seqs and self._admit(self._queued[0]):
                    req = self._queued.pop(0)
                    self._running.append(req)
                    req.admitted = time.perf_counter()
                    req.stats.queued_s = req.admitted - req.submitted
                self._pages_in_use = self.dec.pages_in_use()
                if not self._running:  # everyone queued is waiting for KV memory held by no one: cannot happen
                    self._cv.wait(0.05)
                    continue
            try:
                self._step()
            except Exception as e:  # a failing step fails its requests, never the engine
                log.exception("generation step failed")
                for req in list(self._running):
                    self._finish(req, "error", EdgeJitError(f"generation failed: {e}"))
            self._pages_in_use = self.dec.pages_in_use()
        for req in pending:
            self._finish(req, "cancelled", EdgeJitError("the engine was closed"))
        if self.cache is not None:  # the decoder may serve another engine: leave its KV cache empty
            for sid in self.cache.clear():
                self.dec.remove_sequence(sid)

    # -- KV memory and the prefix cache (under self._cv, on the loop thread) ----------------
    def _free_pages(self) -> int:
        retained = sum(pages_for(len(e)) for e in self.cache) if self.cache is not None else 0
        return self.dec.total_pages - self._reserved - retained

    def _admit(self, req: _Request) -> bool:
        """Give `req` its sequence (from the prefix cache when a retained one shares its prefix)
        and reserve KV pages for its whole length, evicting retained sequences (least recently
        used first) to make room. False: not enough KV memory now, it waits."""
        need = pages_for(min(len(req.prompt) + req.params.max_tokens, self.dec.context))
        match = self.cache.match(req.prompt) if self.cache is not None else None
        while True:
            # a taken-over entry's pages become part of the request's own reservation
            own = pages_for(len(match.entry)) if match is not None and match.take_over else 0
            if self._free_pages() + own >= need:
                break
            victim = self.cache.evict(keep=match.entry if match else None) if self.cache is not None else None
            if victim is None:
                if match is None:
                    return False
                self.cache.take(match.entry)  # the match itself was in the way
                victim, match = match.entry.seq_id, None
            self.dec.remove_sequence(victim)
        if self.cache is not None:
            self.cache.count(match)
        if match is None:
            req.seq = req.id
            self.dec.add_sequence(req.seq)
        else:
            entry, n = match.entry, match.length
            if match.take_over:
                self.cache.take(entry)
                req.seq = entry.seq_id
                self.dec.pop_tokens(req.seq, len(entry) - n)
            else:
                req.seq = req.id
                self.dec.fork_sequence(entry.seq_id, req.seq, n)
            req.prefilled = req.stats.cached_tokens = n
        req.reserved = need
        self._reserved += need
        return True

    def _release(self, req: _Request, keep: bool) -> None:
        """The request's sequence leaves the batch: retained for the prefix cache, or removed."""
        self._running.remove(req)
        self._reserved -= req.reserved
        length = self.dec.lengths.get(req.seq, 0)
        if keep and self.cache is not None and req.prefilled >= len(req.prompt):
            drop = self.cache.add(req.seq, req.history[:length])  # the tokens its KV holds
        else:
            drop = [req.seq]
        for sid in drop:
            self.dec.remove_sequence(sid)
        self._pages_in_use = self.dec.pages_in_use()  # before the request is seen finished

    def _step(self) -> None:
        now = time.perf_counter()
        for req in list(self._running):
            if req.cancelled:
                self._finish(req, "cancelled")
            elif req.deadline is not None and now > req.deadline:
                self._finish(req, "timeout", EdgeJitError("the request timed out"))
        self.counters["steps"] += 1
        # one prefill chunk: prompt tokens of the requests still reading their prompt, in order
        budget, ids, chunks, reqs = self.prefill_chunk, [], [], []
        for req in self._running:
            if budget <= 0:
                break
            if req.prefilled < len(req.prompt):
                take = req.prompt[req.prefilled: req.prefilled + budget]
                ids.append(req.seq)
                chunks.append(take)
                reqs.append(req)
                budget -= len(take)
        if reqs:
            logits = self.dec.prefill(ids, chunks)
            for req, chunk, row in zip(reqs, chunks, logits):
                req.prefilled += len(chunk)
                if req.prefilled == len(req.prompt):
                    req.first_token_at = time.perf_counter()
                    req.stats.prefill_s = req.first_token_at - req.admitted
                    req.stats.ttft_s = req.first_token_at - req.submitted
                    self._accept(req, req.sampler(row, req.history))
        # one decode step for every request that has a token to feed
        active = [r for r in self._running if r.next_token is not None and not r.cancelled]
        if active:
            logits = self.dec.decode([r.seq for r in active], [r.next_token for r in active])
            for req, row in zip(active, logits):
                req.next_token = None
                self._accept(req, req.sampler(row, req.history))

    def _accept(self, req: _Request, token: int) -> None:
        st = req.stats
        if token in self.stop_ids and not req.params.ignore_eos:
            return self._finish(req, "stop")
        st.tokens.append(token)
        req.history.append(token)
        st.completion_tokens += 1
        text, stopped = req.stops.feed(req.stream.push(token))
        if text:
            req.out.put(text)
        if stopped:
            req.stops.pending = ""
            return self._finish(req, "stop", flushed=True)
        if st.completion_tokens >= req.params.max_tokens or self.dec.lengths[req.seq] + 1 >= self.dec.context:
            return self._finish(req, "length")
        req.next_token = token

    def _finish(self, req: _Request, reason: str, error: BaseException | None = None, *, flushed: bool = False) -> None:
        if req.finished.is_set():
            return
        st = req.stats
        st.finish_reason = reason
        if req.first_token_at:
            st.decode_s = time.perf_counter() - req.first_token_at
        if reason in ("stop", "length") and not flushed:
            tail, hit = req.stops.feed(req.stream.flush())
            if not hit:
                tail += req.stops.flush()
            if tail:
                req.out.put(tail)
        if req in self._running:
            with self._cv:  # stats() sums the decoder's sequence lengths under this lock
                self._release(req, keep=reason in ("stop", "length"))
        if error is not None:
            req.out.put(error)
        self.counters["finished"] += 1
        if reason == "cancelled":
            self.counters["cancelled"] += 1
        elif reason == "error":
            self.counters["errors"] += 1
        req.finished.set()
        req.out.put(_END)
