"""The coordinator's SQLite store (WAL): raw messages de-duplicated by (fleet, device, session,
seq), per-period rollups, JIT events, device states and counters.

Every ingest is one transaction that first inserts the raw message; only a new message updates
the rollups. Rollups merge sketches by adding bins and take min/max/sums, so the stored result
does not depend on arrival order, and several coordinator processes may write to one database.
A device is online iff its newest birth session is newer than its newest death session, which
also holds when a stale Will arrives after the next birth.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from edge.telemetry import sketch

from deploy.fleet.coordinator.validate import Message

DEFAULT_ROLLUP_S = 3600.0
MAX_REJECT_LOG = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, received REAL NOT NULL, historical INTEGER NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (fleet, device, session, seq)
);
CREATE TABLE IF NOT EXISTS deaths (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, clean INTEGER NOT NULL,
    received REAL NOT NULL, PRIMARY KEY (fleet, device, session)
);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL,
    birth_session INTEGER, birth_seq INTEGER, birth TEXT, death_session INTEGER, death_clean INTEGER,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    spool_dropped_size INTEGER NOT NULL DEFAULT 0, spool_dropped_age INTEGER NOT NULL DEFAULT 0,
    spool_dropped_refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fleet, device)
);
CREATE TABLE IF NOT EXISTS rollups (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, seq_len INTEGER NOT NULL,
    kind TEXT NOT NULL, period INTEGER NOT NULL,
    count INTEGER NOT NULL, sum_ms REAL NOT NULL, min_ms REAL NOT NULL, max_ms REAL NOT NULL, sketch TEXT NOT NULL,
    PRIMARY KEY (fleet, device, model, seq_len, kind, period)
);
CREATE TABLE IF NOT EXISTS jit_events (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
    model TEXT NOT NULL, event TEXT NOT NULL, t REAL NOT NULL, seq_len INTEGER, bucket INTEGER,
    duration_s REAL, error TEXT,
    PRIMARY KEY (fleet, device, session, seq, idx)
);
CREATE TABLE IF NOT EXISTS gen_rollups (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, metric TEXT NOT NULL, period INTEGER NOT NULL,
    count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, sketch TEXT NOT NULL,
    PRIMARY KEY (fleet, device, model, metric, period)
);
CREATE TABLE IF NOT EXISTS gen_counts (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, name TEXT NOT NULL, period INTEGER NOT NULL,
    value INTEGER NOT NULL, PRIMARY KEY (fleet, device, model, name, period)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pruned (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (fleet, device, session)
);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received REAL NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL
);
"""


class Store:
    def __init__(self, path: str | Path, *, rollup_s: float | None = None):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        with self._tx():
            stored = self.db.execute("SELECT value FROM meta WHERE key='rollup_s'").fetchone()
            if stored is None:
                self.rollup_s = float(rollup_s or DEFAULT_ROLLUP_S)
                self.db.execute("INSERT INTO meta VALUES('rollup_s', ?)", (repr(self.rollup_s),))
                self.db.execute("INSERT OR IGNORE INTO meta VALUES('protocol', '1')")
            else:
                self.rollup_s = float(stored[0])  # fixed at creation: periods must stay comparable

    def _tx(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # -- counters -------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO counters VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n)
        )

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, value FROM counters ORDER BY name").fetchall())

    def reject(self, topic: str, reason: str, detail: str, size: int) -> None:
        with self._tx():
            self._count("received")
            self._count(f"rejected_{reason}")
            self.db.execute(
                "INSERT INTO rejects(received, topic, reason, detail, size) VALUES(?,?,?,?,?)",
                (time.time(), topic[:500], reason, detail[:500], size),
            )
            self.db.execute("DELETE FROM rejects WHERE id <= (SELECT MAX(id) FROM rejects) - ?", (MAX_REJECT_LOG,))

    # -- ingest -------------------------------------------------------------------------------
    def ingest(self, msg: Message, received: float | None = None, *, count: bool = True) -> str:
        """Store a validated message. Returns 'stored', 'duplicate' or 'death'. With count=False
        (re-ingesting another store) the counters are left alone."""
        received = time.time() if received is None else received
        tally = self._count if count else (lambda name, n=1: None)
        with self._tx():
            tally("received")
            self._touch(msg.fleet, msg.device, received)
            if msg.kind == "death":
                self.db.execute(
                    "INSERT OR IGNORE INTO deaths VALUES(?,?,?,?,?)",
                    (msg.fleet, msg.device, msg.session, int(msg.body["clean"]), received),
                )
                self.db.execute(
                    "UPDATE devices SET death_session = ?, death_clean = ? WHERE fleet=? AND device=? "
                    "AND (death_session IS NULL OR death_session <= ?)",
                    (msg.session, int(msg.body["clean"]), msg.fleet, msg.device, msg.session),
                )
                tally("deaths")
                return "death"
            cur = self.db.execute(
                "INSERT OR IGNORE INTO messages VALUES(?,?,?,?,?,?,?,?)",
                (msg.fleet, msg.device, msg.session, msg.seq, msg.kind, received,
                 int(bool(msg.body.get("historical"))), msg.payload),
            )
            if cur.rowcount == 0:
                tally("duplicates")
                return "duplicate"
            tally(f"stored_{msg.kind}")
            if msg.body.get("historical"):
                tally("historical")
            if msg.kind == "metrics":
                self._ingest_metrics(msg)
            elif msg.kind == "jit":
                self._ingest_jit(msg, tally)
            else:
                self._ingest_birth(msg)
            return "stored"

    def _touch(self, fleet: str, device: str, received: float) -> None:
        self.db.execute(
            "INSERT INTO devices(fleet, device, first_seen, last_seen) VALUES(?,?,?,?) "
            "ON CONFLICT(fleet, device) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen), "
            "first_seen = MIN(first_seen, excluded.first_seen)",
            (fleet, device, received, received),
        )

    def _ingest_birth(self, msg: Message) -> None:
        self.db.execute(
            "UPDATE devices SET birth_session = ?, birth_seq = ?, birth = ? WHERE fleet=? AND device=? "
            "AND (birth_session IS NULL OR birth_session < ? OR (birth_session = ? AND birth_seq < ?))",
            (msg.session, msg.seq, msg.payload, msg.fleet, msg.device, msg.session, msg.session, msg.seq),
        )

    def _ingest_metrics(self, msg: Message) -> None:
        period = int(msg.body["t1"] // self.rollup_s)
        decoded = msg.sketches or [sketch.decode(s["sketch"]) for s in msg.body["series"]]
        for s, sk in zip(msg.body["series"], decoded):
            self._merge_rollup(msg.fleet, msg.device, s["model"], s["seq_len"], s["kind"], period,
                               s["count"], s["sum_ms"], s["min_ms"], s["max_ms"], sk)
        for g in msg.body.get("generation", ()):
            self._ingest_generation(msg.fleet, msg.device, period, g)
        sp = msg.body.get("spool") or {}
        self.db.execute(
            "UPDATE devices SET spool_dropped_size = MAX(spool_dropped_size, ?), spool_dropped_age = MAX(spool_dropped_age, ?), "
            "spool_dropped_refused = MAX(spool_dropped_refused, ?) WHERE fleet=? AND device=?",
            (sp.get("dropped_size", 0), sp.get("dropped_age", 0), sp.get("dropped_refused", 0), msg.fleet, msg.device),
        )

    def _ingest_generation(self, fleet: str, device: str, period: int, g: dict) -> None:
        """A text-generation model's window: distributions merged like latency rollups, counts added."""
        model = g["model"]
        counts = {k: g.get(k) for k in ("requests", "prompt_tokens", "completion_tokens", "prefix_hits", "prefix_lookups")}
        counts.update({f"finish_{k}": v for k, v in (g.get("finish") or {}).items()})
        self.db.executemany(
            "INSERT INTO gen_counts VALUES(?,?,?,?,?,?) ON CONFLICT(fleet, device, model, name, period) "
            "DO UPDATE SET value = value + excluded.value",
            [(fleet, device, model, k, period, v) for k, v in counts.items() if v is not None],
        )
        for metric, d in g.items():
            if not (isinstance(d, dict) and "sketch" in d):
                continue
            key = (fleet, device, model, metric, period)
            sk = sketch.decode(d["sketch"])
            row = self.db.execute(
                "SELECT sketch FROM gen_rollups WHERE fleet=? AND device=? AND model=? AND metric=? AND period=?", key
            ).fetchone()
            if row is not None:
                sk = sketch.merged([sketch.decode(row[0]), sk])
            self.db.execute(
                "INSERT INTO gen_rollups VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device, model, metric, period) "
                "DO UPDATE SET count = count + excluded.count, sum = sum + excluded.sum, min = MIN(min, excluded.min), "
                "max = MAX(max, excluded.max), sketch = excluded.sketch",
                (*key, d["count"], d["sum"], d["min"], d["max"], sketch.encode(sk)),
            )

    def _merge_rollup(self, fleet, device, model, seq_len, kind, period, count, sum_ms, min_ms, max_ms, sk) -> None:
        key = (fleet, device, model, seq_len, kind, period)
        row = self.db.execute(
            "SELECT sketch FROM rollups WHERE fleet=? AND device=? AND model=? AND seq_len=? AND kind=? AND period=?", key
        ).fetchone()
        if row is not None:
            sk = sketch.merged([sketch.decode(row[0]), sk])
        self.db.execute(
            "INSERT INTO rollups VALUES(?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device, model, seq_len, kind, period) "
            "DO UPDATE SET count = count + excluded.count, sum_ms = sum_ms + excluded.sum_ms, "
            "min_ms = MIN(min_ms, excluded.min_ms), max_ms = MAX(max_ms, excluded.max_ms), sketch = excluded.sketch",
            (*key, count, sum_ms, min_ms, max_ms, sketch.encode(sk)),
        )

    def _ingest_jit(self, msg: Message, tally) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO jit_events VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (msg.fleet, msg.device, msg.session, msg.seq, i, e["model"], e["event"], e["t"],
                 e.get("seq_len"), e.get("bucket"), e.get("duration_s"), e.get("error"))
                for i, e in enumerate(msg.body["events"])
            ],
        )
        if msg.body.get("events_dropped"):
            tally("jit_events_dropped_by_devices", msg.body["events_dropped"])

    # -- queries ------------------------------------------------------------------------------
    def known_birth(self, fleet: str, device: str) -> bool:
        row = self.db.execute("SELECT birth FROM devices WHERE fleet=? AND device=?", (fleet, device)).fetchone()
        return row is not None and row[0] is not None

    def message_keys(self, kinds=("metrics", "jit")) -> list[tuple]:
        q = f"SELECT fleet, device, session, seq FROM messages WHERE kind IN ({','.join('?' * len(kinds))}) ORDER BY 1,2,3,4"
        return self.db.execute(q, kinds).fetchall()

    def hot_lengths(self, *, periods: int = 24, top_k: int = 8, min_share: float = 0.05) -> dict[str, list[int]]:
        """Per model, the most requested sequence lengths across the fleet in the last `periods`
        rollup periods: at most top_k, each with at least min_share of the model's requests."""
        newest = self.db.execute("SELECT MAX(period) FROM rollups").fetchone()[0]
        if newest is None:
            return {}
        rows = self.db.execute(
            "SELECT model, seq_len, SUM(count) FROM rollups WHERE period > ? AND seq_len > 0 GROUP BY model, seq_len",
            (newest - periods,),
        ).fetchall()
        per_model: dict[str, list[tuple[int, int]]] = {}
        for model, n, c in rows:
            per_model.setdefault(model, []).append((c, n))
        out = {}
        for model, pairs in per_model.items():
            total = sum(c for c, _ in pairs)
            pairs.sort(key=lambda p: (-p[0], p[1]))
            out[model] = [n for c, n in pairs[:top_k] if c >= min_share * total]
        return out

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Delete raw messages and JIT events received more than `older_than_s` ago (rollups,
        device states and counters stay). A duplicate of a pruned message would be counted
        again, so keep this well above the devices' spool age bound (7 days by default)."""
        cut = (time.time() if now is None else now) - older_than_s
        with self._tx():
            old = self.db.execute("SELECT fleet, device, session, seq FROM messages WHERE received < ?", (cut,)).fetchall()
            self.db.executemany(
                "DELETE FROM jit_events WHERE fleet=? AND device=? AND session=? AND seq=?", old
            )
            self.db.execute(  # so that pruned messages are not mistaken for gaps
                "INSERT INTO pruned SELECT fleet, device, session, COUNT(*) FROM messages WHERE received < ? "
                "GROUP BY fleet, device, session ON CONFLICT(fleet, device, session) DO UPDATE SET n = n + excluded.n",
                (cut,),
            )
            n = self.db.execute("DELETE FROM messages WHERE received < ?", (cut,)).rowcount
            if n:
                self._count("pruned", n)
            return n

    # -- merging stores ------------------------------------------------------------------------
    def import_store(self, other_path: str | Path) -> None:
        """Re-ingest another store's raw messages and deaths (de-duplicated, order-independent),
        e.g. to report over several coordinators' databases."""
        other = sqlite3.connect(f"file:{other_path}?mode=ro", uri=True)
        try:
            for fleet, device, kind, received, payload in other.execute(
                "SELECT fleet, device, kind, received, payload FROM messages"
            ):
                body = json.loads(payload)
                self.ingest(Message(fleet, device, kind, body, payload), received, count=False)
            for fleet, device, session, clean, received in other.execute("SELECT * FROM deaths"):
                body = {"session": session, "clean": bool(clean)}
                self.ingest(Message(fleet, device, "death", body, ""), received, count=False)
            with self._tx():
                for name, value in other.execute("SELECT name, value FROM counters"):
                    self._count(name, value)
                self.db.executemany(
                    "INSERT INTO pruned VALUES(?,?,?,?) ON CONFLICT(fleet, device, session) DO UPDATE SET n = MAX(n, excluded.n)",
                    other.execute("SELECT fleet, device, session, n FROM pruned").fetchall(),
                )
        finally:
            other.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); takes the write lock up front so
    concurrent coordinator processes serialize instead of failing to upgrade a read lock."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *exc):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
