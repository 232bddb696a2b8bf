"""The device's on-disk spool: telemetry windows not yet acknowledged by the broker (SQLite).

paho keeps unsent messages only in memory; the spool keeps every window from the moment it is
closed until its PUBACK arrives, across disconnects and process restarts, and hands them out in
the order they were made. It also keeps the session counter and sequence number so they keep
increasing across restarts.

Drop policy (bounded in size and age): when the spool holds more than `max_windows` windows or
`max_bytes` bytes of payload, the OLDEST windows are dropped first until it fits; windows older
than `max_age_s` are dropped too. The newest window and those in flight (sent, PUBACK pending,
at most `max_inflight`) are never dropped for size, so the bound may be exceeded by that many. Every drop is counted (by reason, persistently) and reported in
the next metrics window, and the coordinator sees the hole as a gap in the sequence numbers.
Newest-first survival is deliberate: the fleet view and the hot lengths care about the present.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpooledWindow:
    id: int
    session: int
    seq: int
    kind: str
    payload: bytes


class Spool:
    """Thread-safe (one connection, one lock); every method is a short transaction."""

    def __init__(self, path: str | Path, *, max_windows: int = 10_000, max_bytes: int = 64 << 20, max_age_s: float = 7 * 86400):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_windows, self.max_bytes, self.max_age_s = max_windows, max_bytes, max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- counters kept across restarts ----------------------------------------------
    def _get(self, key: str, default: int = 0) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def get(self, key: str, default: int = 0) -> int:
        with self._lock:
            return self._get(key, default)

    def session(self) -> tuple[int, int]:
        """(current session counter, next sequence number in it)."""
        with self._lock:
            return self._get("session"), self._get("next_seq")

    def new_session(self) -> int:
        """Start the next session (on a successful connect); its first sequence number is 0."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            session = self._get("session") + 1
            self._set("session", session)
            self._set("next_seq", 0)
            return session

    def take_seq(self) -> tuple[int, int]:
        """Reserve the next (session, seq) for a message that is not spooled (a birth)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            session, seq = self._get("session"), self._get("next_seq")
            self._set("next_seq", seq + 1)
            return session, seq

    # -- windows ----------------------------------------------------------------------
    def append(self, kind: str, make_payload, *, in_flight=()) -> SpooledWindow:
        """Number and store a window: make_payload(session, seq) -> bytes. Returns the window.
        Enforces the bounds afterwards, dropping older windows, but not those in `in_flight`
        (ids sent and awaiting their PUBACK; they may still arrive)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            session, seq = self._get("session"), self._get("next_seq")
            payload = make_payload(session, seq)
            cur = self._db.execute(
                "INSERT INTO windows(session, seq, kind, created, payload) VALUES(?,?,?,?,?)",
                (session, seq, kind, time.time(), payload),
            )
            self._set("next_seq", seq + 1)
            self._enforce_bounds(keep={cur.lastrowid, *in_flight})
            return SpooledWindow(cur.lastrowid, session, seq, kind, payload)

    def _enforce_bounds(self, keep=frozenset()) -> None:
        if self.max_age_s is not None:
            cut = time.time() - self.max_age_s
            n = self._db.execute("DELETE FROM windows WHERE created < ?", (cut,)).rowcount
            if n:
                self._set("dropped_age", self._get("dropped_age") + n)
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM windows").fetchone()
        dropped = 0
        if count > self.max_windows or size > self.max_bytes:
            for wid, n in self._db.execute("SELECT id, LENGTH(payload) FROM windows ORDER BY id").fetchall():
                if count <= self.max_windows and size <= self.max_bytes:
                    break
                if wid in keep:
                    continue
                self._db.execute("DELETE FROM windows WHERE id=?", (wid,))
                count, size, dropped = count - 1, size - n, dropped + 1
        if dropped:
            self._set("dropped_size", self._get("dropped_size") + dropped)

    def enforce_bounds(self) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._enforce_bounds()

    def pending(self, after_id: int = 0, limit: int = 100) -> list[SpooledWindow]:
        """Unacknowledged windows with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, session, seq, kind, payload FROM windows WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [SpooledWindow(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def ack(self, window_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM windows WHERE id=?", (window_id,))

    def drop(self, window_id: int, reason: str) -> None:
        """Give up on a window the broker refused (counted as dropped_<reason>)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self._db.execute("DELETE FROM windows WHERE id=?", (window_id,)).rowcount:
                self._set(f"dropped_{reason}", self._get(f"dropped_{reason}") + 1)

    def stats(self) -> dict:
        with self._lock:
            count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM windows").fetchone()
            return {
                "pending": count,
                "pending_bytes": size,
                "dropped_size": self._get("dropped_size"),
                "dropped_age": self._get("dropped_age"),
                "dropped_refused": self._get("dropped_refused"),
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()
