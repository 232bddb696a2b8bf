"""The coordinator's store and report without a broker: order-independent merge, de-duplication,
device state from births and (stale) deaths, regressions against a device's own history."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from deploy.fleet.coordinator import Store, report, validate
from edge.telemetry import sketch

FLEET = "f1"


def metrics(device, session, seq, t1, series, historical=False):
    body = {"v": 1, "type": "metrics", "fleet": FLEET, "device": device, "session": session, "seq": seq,
            "t0": t1 - 1, "t1": t1, "series": series, "spool": {"pending": 0, "dropped_size": 0}}
    if historical:
        body["historical"] = True
    return f"edgejit/{FLEET}/{device}/metrics", json.dumps(body).encode()


def series(model, seq_len, values_ms, kind="generic"):
    sk = sketch.new()
    for v in values_ms:
        sk.add(float(v))
    return {"model": model, "seq_len": seq_len, "kind": kind, "count": len(values_ms), "sum_ms": float(sum(values_ms)),
            "min_ms": float(min(values_ms)), "max_ms": float(max(values_ms)), "sketch": sketch.encode(sk)}


def birth(device, session, seq=0):
    body = {"v": 1, "type": "birth", "fleet": FLEET, "device": device, "session": session, "seq": seq, "ts": 1.0,
            "host": {"arch": "aarch64", "cores": 4, "cpu_features": ["neon"], "os": "Linux"},
            "versions": {"tvm": "0.27.0"}, "models": [{"name": "m", "sha256": "0" * 64, "precision": "fp32"}],
            "policy": {}}
    return f"edgejit/{FLEET}/{device}/birth", json.dumps(body).encode()


def death(device, session, clean=False):
    body = {"v": 1, "type": "death", "fleet": FLEET, "device": device, "session": session, "ts": 1.0, "clean": clean}
    return f"edgejit/{FLEET}/{device}/death", json.dumps(body).encode()


def ingest(store, messages):
    return [store.ingest(validate.parse("edgejit", t, p)) for t, p in messages]


def _stream(rng):
    msgs, values = [], {}
    for d, device in enumerate(("dev-a", "dev-b", "dev-c")):
        msgs.append(birth(device, 1))
        for seq in range(1, 13):
            for n in (8, 100):
                vals = list(rng.lognormal(mean=1 + d * 0.3 + n / 200, sigma=0.4, size=int(rng.integers(1, 40))))
                values.setdefault((device, n), []).extend(vals)
                msgs.append(metrics(device, 1, seq * 10 + (n == 100), 1000.0 + seq * 7, [series("m", n, vals)]))
    return msgs, values


def _snapshot(store):
    rows = store.db.execute("SELECT fleet, device, model, seq_len, kind, period, count, min_ms, max_ms, sketch FROM rollups ORDER BY 1,2,3,4,5,6").fetchall()
    rep = report.build(store, now=0.0)
    rep["counters"] = {k: v for k, v in rep["counters"].items() if k not in ("duplicates", "received")}
    for d in rep["devices"]:
        d.pop("last_seen"), d.pop("first_seen"), d.pop("last_seen_ago_s")
    return rows, rep


def test_merge_does_not_depend_on_message_order_and_drops_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    msgs, values = _stream(rng)
    a = Store(tmp_path / "a.sqlite", rollup_s=20)
    assert set(ingest(a, msgs)) == {"stored"}
    shuffled = msgs + random.Random(5).sample(msgs, 40)  # plus re-sent duplicates
    random.Random(7).shuffle(shuffled)
    b = Store(tmp_path / "b.sqlite", rollup_s=20)
    results = ingest(b, shuffled)
    assert results.count("duplicate") == 40 and b.counters()["duplicates"] == 40
    assert _snapshot(a) == _snapshot(b)
    # and the fleet numbers are those of all the raw values (sketch accuracy 1%)
    rep = report.build(a)
    (b8,) = [x for x in rep["models"]["m"]["buckets"] if x["bucket"] == "5-8"]
    every = np.sort(np.concatenate([values[(d, 8)] for d in ("dev-a", "dev-b", "dev-c")]))
    assert b8["count"] == len(every)
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        exact = every[int(q * (len(every) - 1))]
        assert abs(b8[key] - exact) <= 0.0101 * exact
    one = np.sort(values[("dev-b", 8)])
    assert abs(b8["devices"]["dev-b"]["p99_ms"] - one[int(0.99 * (len(one) - 1))]) <= 0.0101 * one[-1]


def test_split_stores_merge_to_the_same_report(tmp_path):
    """Two coordinators behind a shared subscription, each with its own database: `fleet --db a
    --db b` re-ingests both and equals one coordinator that saw everything."""
    from deploy.cli.fleet import open_merged

    msgs, _ = _stream(np.random.default_rng(4))
    whole = Store(tmp_path / "whole.sqlite", rollup_s=20)
    ingest(whole, msgs)
    parts = [Store(tmp_path / f"p{i}.sqlite", rollup_s=20) for i in range(2)]
    for i, m in enumerate(msgs):
        ingest(parts[i % 2], [m])
    ingest(parts[1], msgs[:5])  # a redelivery that landed on the other coordinator
    for p in parts:
        p.close()
    merged = open_merged([str(tmp_path / "p0.sqlite"), str(tmp_path / "p1.sqlite")])
    assert _snapshot(merged)[0] == _snapshot(whole)[0]
    assert report.build(merged)["models"] == report.build(whole)["models"]


def test_online_state_from_sessions_even_with_a_stale_will(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    ingest(s, [birth("dev-a", 1), death("dev-a", 1)])
    assert report.build(s)["devices"][0]["state"] == "offline"
    # reconnect: birth of session 2, then the broker delivers session 1's Will late
    ingest(s, [birth("dev-a", 2), death("dev-a", 1)])
    (d,) = report.build(s)["devices"]
    assert (d["state"], d["session"]) == ("online", 2)
    ingest(s, [death("dev-a", 2, clean=True)])
    (d,) = report.build(s)["devices"]
    assert (d["state"], d["clean_shutdown"]) == ("offline", True)
    # online but no window for more than 3 windows (birth says window_s; 10 s if absent): silent
    last = s.db.execute("SELECT last_seen FROM devices").fetchone()[0]
    ingest(s, [birth("dev-a", 3)])
    assert report.build(s, now=last + 30)["devices"][0]["state"] == "online"
    assert report.build(s, now=last + 3600)["devices"][0]["state"] == "silent"
    # a device seen only through windows is 'unknown' until its birth arrives
    ingest(s, [metrics("dev-z", 4, 3, 50.0, [series("m", 8, [1.0])])])
    assert {d["device"]: d["state"] for d in report.build(s)["devices"]}["dev-z"] == "unknown"
    assert not s.known_birth(FLEET, "dev-z") and s.known_birth(FLEET, "dev-a")


def test_regression_against_own_history(tmp_path):
    s = Store(tmp_path / "s.sqlite", rollup_s=10)
    rng = np.random.default_rng(0)
    msgs = []
    for seq, t in enumerate((5.0, 15.0, 25.0, 35.0), start=1):
        slow = t > 30  # dev-a's latest period is 1.6x slower; dev-b stays the same
        msgs.append(metrics("dev-a", 1, seq, t, [series("m", 16, list(rng.normal(10 * (1.6 if slow else 1), 0.3, 50)))]))
        msgs.append(metrics("dev-b", 1, seq, t, [series("m", 16, list(rng.normal(10, 0.3, 50)))]))
    ingest(s, msgs)
    rep = report.build(s, regress_threshold=0.25, min_count=20)
    (r,) = rep["regressions"]
    assert (r["device"], r["model"], r["bucket"]) == ("dev-a", "m", "9-16")
    assert r["ratio"] == pytest.approx(1.6, rel=0.03)
    assert "dev-a m length 9-16" in report.render(rep)
    assert report.build(s, regress_threshold=0.7)["regressions"] == []


def test_hot_lengths_top_k_with_min_share(tmp_path):
    s = Store(tmp_path / "s.sqlite", rollup_s=10)
    ingest(s, [metrics("dev-a", 1, 1, 5.0, [series("m", 16, [1.0] * 60), series("m", 32, [1.0] * 30),
                                             series("m", 7, [1.0] * 8), series("m", 200, [1.0] * 2)]),
               metrics("dev-b", 1, 1, 5.0, [series("m", 32, [1.0] * 40), series("other", 4, [1.0])])])
    assert s.hot_lengths(top_k=8, min_share=0.05) == {"m": [32, 16, 7], "other": [4]}  # 70, 60, 8 of 140; 200 has 1.4%
    assert s.hot_lengths(top_k=1, min_share=0.05) == {"m": [32], "other": [4]}


@pytest.mark.parametrize("topic, payload, reason", [
    ("edgejit/f1/dev-a/metrics", b"x" * 300_000, "oversized"),
    ("edgejit/f1/dev-a/metrics", b"\x80abc", "malformed"),
    ("edgejit/f1/dev-a/metrics", b'{"v": Infinity}', "malformed"),
    ("edgejit/f1/dev-a/metrics", b'"just a string"', "schema"),
    ("edgejit/f1/dev-a/gossip", b"{}", "topic"),
    ("edgejit/f1/_coordinator/metrics", b"{}", "topic"),
    ("edgejit/f1/dev-a/birth", json.dumps({**json.loads(birth("dev-a", 1)[1]), "seq": 2**64}).encode(), "schema"),
    ("edgejit/f1/dev-a/death", death("dev-b", 1)[1], "mismatch"),
])
def test_validation_reasons(topic, payload, reason):
    with pytest.raises(validate.Rejected) as e:
        validate.parse("edgejit", topic, payload)
    assert e.value.reason == reason


def test_publisher_payloads_match_the_schema(tmp_path):
    """What the device publisher writes is what the coordinator's schema accepts."""
    from edge.telemetry import Publisher

    pub = Publisher({"port": 1, "device_id": "dev-a", "fleet": FLEET, "window_s": 60,
                     "spool_path": str(tmp_path / "s.sqlite")}, start=False)
    pub._series.clear()
    pub._handle(("request", "m", 12, "padded", 0.004))
    pub._handle(("jit", "m", 5.0, {"event": "compile_failed", "bucket": 16, "duration_s": 0.5, "error": "boom"}))
    pub._close_window()
    for w in pub.spool.pending():
        msg = validate.parse("edgejit", f"edgejit/{FLEET}/dev-a/{w.kind}", w.payload)
        assert msg.seq == w.seq
    assert validate.parse("edgejit", f"edgejit/{FLEET}/dev-a/death", pub._death(3, clean=False)).session == 3
    pub.close()


def test_big_windows_are_split_under_the_size_limit(tmp_path):
    """A window with traffic at 1500 distinct lengths does not exceed the coordinator's size
    limit: the publisher splits it into several messages, each stored, nothing lost."""
    from edge.telemetry import Publisher

    pub = Publisher({"port": 1, "device_id": "dev-a", "fleet": FLEET, "window_s": 60, "max_message_bytes": 65536,
                     "spool_path": str(tmp_path / "s.sqlite")}, start=False)
    for n in range(1, 1501):
        for k in range(3):
            pub._handle(("request", "m", n, "generic", 0.001 * (1 + k)))
    for i in range(1000):
        pub._handle(("jit", "m", 5.0, {"event": "cache_miss", "seq": i, "error": "x" * 300}))
    pub._close_window()
    windows = pub.spool.pending(limit=1000)
    assert len([w for w in windows if w.kind == "metrics"]) > 3 and len([w for w in windows if w.kind == "jit"]) > 3
    assert all(len(w.payload) <= 65536 for w in windows)
    store = Store(tmp_path / "c.sqlite")
    for w in windows:
        assert store.ingest(validate.parse("edgejit", f"edgejit/{FLEET}/dev-a/{w.kind}", w.payload)) == "stored"
    assert store.db.execute("SELECT SUM(count), COUNT(DISTINCT seq_len) FROM rollups").fetchone() == (4500, 1500)
    assert store.db.execute("SELECT COUNT(*) FROM jit_events").fetchone() == (1000,)
    pub.close()


def test_odd_runtime_values_never_cost_a_window(tmp_path):
    """Whatever a runtime or JIT passes to the listener, the window stays valid."""
    from edge.telemetry import Publisher

    pub = Publisher({"port": 1, "device_id": "dev-a", "fleet": FLEET, "window_s": 60,
                     "spool_path": str(tmp_path / "s.sqlite")}, start=False)
    for args in (("m", None, "generic", 0.001), ("m", 10**9, "variant", 0.002), ("m" * 500, 8, "Weird Kind!", 0.003),
                 ("m", 8, "bucketed", 0.004), ("m", 8, "generic", float("nan")), ("m", "12", "padded", 0.005)):
        pub._handle(("request", *args))
    for ev in ({"event": "compile_finished", "seq": 16.0, "duration_s": 1}, {"event": "New Event"},
               {"event": "cache_hit", "seq": True, "bucket": -3, "duration_s": float("inf")}, {}):
        pub._handle(("jit", "m", 5.0, ev))
    pub._close_window()
    store = Store(tmp_path / "c.sqlite")
    for w in pub.spool.pending():
        assert store.ingest(validate.parse("edgejit", f"edgejit/{FLEET}/dev-a/{w.kind}", w.payload)) == "stored"
    rows = store.db.execute("SELECT model, seq_len, kind, count FROM rollups ORDER BY kind, seq_len").fetchall()
    assert rows == [("m", 8, "bucketed", 1), ("m", 0, "generic", 1), ("m", 12, "padded", 1), ("m" * 256, 8, "unknown", 1),
                    ("m", 0, "variant", 1)]
    events = store.db.execute("SELECT event, seq_len, bucket, duration_s FROM jit_events ORDER BY idx").fetchall()
    assert events == [("compile_finished", 16, None, 1.0), ("unknown", None, None, None), ("cache_hit", None, None, None),
                      ("unknown", None, None, None)]
    pub.close()


def test_prune_keeps_rollups_states_and_gap_counts(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    ingest(s, [birth("dev-a", 1), metrics("dev-a", 1, 1, 5.0, [series("m", 8, [1.0, 2.0])])])
    assert s.prune(3600) == 0
    assert s.prune(3600, now=s.db.execute("SELECT MAX(received) FROM messages").fetchone()[0] + 7200) == 2
    assert s.db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    ingest(s, [metrics("dev-a", 1, 2, 6.0, [series("m", 8, [3.0])]), metrics("dev-a", 1, 4, 6.0, [series("m", 8, [3.0])])])
    rep = report.build(s)
    assert rep["models"]["m"]["buckets"][0]["count"] == 4 and rep["devices"][0]["state"] == "online"
    assert rep["devices"][0]["missing_windows"] == 1  # seq 3; the pruned 0 and 1 are not gaps
