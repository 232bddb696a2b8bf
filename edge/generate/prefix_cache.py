"""The prefix cache: KV of finished sequences kept for prompts that start the same way.

A finished sequence is not removed from the decoder's paged KV cache: it stays there as a retained
entry, with the tokens its KV holds. A new prompt is matched against the entries (longest common
token prefix); the engine then starts the new sequence from the best entry (forked at the match,
sharing its pages, or taken over when the match covers nearly all of it) and prefills only the rest.
A shared system prompt and a conversation continued turn by turn are the cases this serves.

This module only keeps the book: which entries exist, their tokens, LRU order and the token budget.
The engine owns the KV cache and does the forks and removals the book asks for.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edge.generate.decoder import PAGE_SIZE

MIN_MATCH = PAGE_SIZE  # a shorter common prefix saves too little to be worth a fork
TAKE_OVER = 0.9  # a match this close to an entry's whole length reuses the entry itself (no copy)


@dataclass(eq=False)
class Entry:
    seq_id: int  # the retained sequence in the KV cache
    tokens: np.ndarray  # int32: the tokens whose KV the sequence holds, in order

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Match:
    entry: Entry
    length: int  # tokens of the prompt whose KV the entry already holds

    @property
    def take_over(self) -> bool:
        """Reuse the entry's sequence itself (its tail beyond the match popped) instead of forking."""
        return self.length >= TAKE_OVER * len(self.entry)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """Retained sequences by token content, at most `capacity_tokens` tokens in all (each entry
    counted whole, even where entries share pages: a bound, not an estimate), least recently used
    evicted first. `max_entries` bounds the scan a lookup does."""

    def __init__(self, capacity_tokens: int, *, max_entries: int = 64):
        self.capacity_tokens = int(capacity_tokens)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.tokens = 0
        self.counters = {"prefix_lookups": 0, "prefix_hits": 0, "prefix_tokens_reused": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries.values()))

    def match(self, prompt: list[int]) -> Match | None:
        """The entry sharing the longest prefix with `prompt`, at most len(prompt) - 1 tokens (the
        last prompt token is always computed: its logits choose the first reply token)."""
        p = np.asarray(prompt, dtype=np.int32)
        best, best_n = None, 0
        for e in self._entries.values():
            n = common_prefix(e.tokens, p)
            # equal matches: the shortest entry (a take-over then pops the fewest tokens)
            if n > best_n or (n == best_n and best is not None and len(e) < len(best)):
                best, best_n = e, n
        best_n = min(best_n, len(prompt) - 1)
        if best is None or best_n < MIN_MATCH:
            return None
        return Match(best, best_n)

    def count(self, match: Match | None) -> None:
        """A prompt was admitted with this match (or none): the counters, and the entry is now the
        most recently used."""
        self.counters["prefix_lookups"] += 1
        if match is not None:
            self.counters["prefix_hits"] += 1
            self.counters["prefix_tokens_reused"] += match.length
            self._entries.move_to_end(match.entry.seq_id)

    def take(self, entry: Entry) -> None:
        """The entry's sequence now belongs to a running request: no longer in the book."""
        del self._entries[entry.seq_id]
        self.tokens -= len(entry)

    def add(self, seq_id: int, tokens: list[int]) -> list[int]:
        """Retain a finished sequence. Returns the sequence ids the caller must remove from the KV
        cache: the new one if it is not kept (too short, larger than the budget), entries it makes
        redundant (their tokens are a prefix of its tokens: every match they give, it gives) and
        the least recently used beyond the budget."""
        t = np.asarray(tokens, dtype=np.int32)
        if len(t) < MIN_MATCH or len(t) > self.capacity_tokens:
            return [seq_id]
        drop = [e for e in self._entries.values() if len(e) <= len(t) and common_prefix(e.tokens, t) == len(e)]
        for e in drop:
            self.take(e)
        self._entries[seq_id] = Entry(seq_id, t)
        self.tokens += len(t)
        out = [e.seq_id for e in drop]
        while self.tokens > self.capacity_tokens or len(self._entries) > self.max_entries:
            out.append(self.evict())
        return out

    def evict(self, keep: Entry | None = None) -> int | None:
        """Drop the least recently used entry (other than `keep`); its sequence id, or None."""
        for e in self._entries.values():
            if e is not keep:
                self.take(e)
                return e.seq_id
        return None

    def clear(self) -> list[int]:
        out = list(self._entries)
        self._entries.clear()
        self.tokens = 0
        return out
