"""Coordinator + devices against a real Mosquitto (auth + per-device ACL): births and deaths
(clean and by Will from a killed process), broker restart with exactly-once arrival, coordinator
killed mid-stream, duplicates, bad messages, spool drops, shared subscriptions, hot lengths."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deploy.fleet.coordinator import Coordinator, Store, report
from edge.telemetry import BrokerSettings, Publisher
from edge.telemetry.mqtt import make_client
from tests.mqtt import FLEET, PASSWORDS, coordinator_settings, device_config, needs_mosquitto, start_broker, wait_for

pytestmark = needs_mosquitto
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.close()


def _coordinator(broker, db, cid, **kw) -> Coordinator:
    store = Store(db, rollup_s=kw.pop("rollup_s", 1.0))
    kw.setdefault("hot_interval_s", 0.2)
    return Coordinator(coordinator_settings(broker), store, fleet=FLEET, coordinator_id=cid, session_expiry_s=120, **kw).start()


@pytest.fixture
def coord(broker, tmp_path):
    c = _coordinator(broker, tmp_path / "fleet.sqlite", f"c-{tmp_path.name}")
    yield c
    c.stop()
    c.store.close()


def q(db, sql, *args):
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def counters(db) -> dict:
    return dict(q(db, "SELECT name, value FROM counters"))


def device_state(db, device):
    rows = q(db, "SELECT birth_session, death_session, death_clean FROM devices WHERE fleet=? AND device=?", FLEET, device)
    if not rows or rows[0][0] is None:
        return None
    b, d, clean = rows[0]
    return ("offline", bool(clean)) if d is not None and d >= b else ("online", None)


def total_requests(db, device=None):
    if not Path(db).exists() or not q(db, "SELECT 1 FROM sqlite_master WHERE name='rollups'"):
        return 0
    if device:
        return q(db, "SELECT COALESCE(SUM(count), 0) FROM rollups WHERE device=?", device)[0][0]
    return q(db, "SELECT COALESCE(SUM(count), 0) FROM rollups")[0][0]


class Recorder:
    """Wraps a publisher's spool to record every window it makes: (session, seq) keys."""

    def __init__(self, pub: Publisher):
        self.keys = []
        orig = pub.spool.append

        def append(kind, make, **kw):
            w = orig(kind, make, **kw)
            self.keys.append((w.session, w.seq))
            return w

        pub.spool.append = append


class Traffic:
    """A thread making small real numpy 'inference' calls and reporting them to the publisher."""

    def __init__(self, pub: Publisher, model="tiny", lengths=(8, 16, 32)):
        self.pub, self.model, self.lengths, self.n = pub, model, lengths, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        rng = np.random.default_rng(0)
        w = rng.standard_normal((32, 32)).astype(np.float32)
        while not self._stop.is_set():
            n = self.lengths[self.n % len(self.lengths)]
            x = rng.standard_normal((n, 32)).astype(np.float32)
            t = time.perf_counter()
            np.tanh(x @ w)
            self.pub.on_request(self.model, n, "generic", time.perf_counter() - t)
            self.n += 1
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.n


def retained_state(broker, coordinator_id):
    """The coordinator's retained state message, as a new subscriber sees it."""
    import queue

    got = queue.Queue()
    c = make_client(coordinator_settings(broker), f"peek-{time.monotonic_ns()}")
    c.on_message = lambda _c, _u, m: got.put(json.loads(m.payload)["state"] if m.retain else None)
    c.connect(broker.host, broker.port)
    c.subscribe(f"edgejit/{FLEET}/_coordinator/state/{coordinator_id}", qos=1)
    c.loop_start()
    try:
        return got.get(timeout=5)
    finally:
        c.disconnect()
        c.loop_stop()


def _window_keys(db, device):
    return q(db, "SELECT session, seq FROM messages WHERE device=? AND kind IN ('metrics', 'jit') ORDER BY 1, 2", device)


def _spawn_device(broker, device, tmp_path):
    cfg_path = tmp_path / f"{device}.json"
    cfg_path.write_text(json.dumps(device_config(broker, device, tmp_path)))
    status = tmp_path / f"{device}.status.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "telemetry_device.py"), str(cfg_path), str(status)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, status


def _status(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def test_birth_death_clean_shutdown_and_killed_process(broker, coord, tmp_path):
    db = coord.store.path
    a, a_status = _spawn_device(broker, "dev-a", tmp_path)
    b, b_status = _spawn_device(broker, "dev-b", tmp_path)
    try:
        wait_for(lambda: device_state(db, "dev-a") == ("online", None) and device_state(db, "dev-b") == ("online", None),
                 timeout=20, what="both births")
        wait_for(lambda: total_requests(db, "dev-b") > 0, what="dev-b metrics")
        birth = json.loads(q(db, "SELECT birth FROM devices WHERE device='dev-a'")[0][0])
        assert birth["session"] == 1 and birth["host"]["cores"] >= 1
        a.send_signal(signal.SIGTERM)  # clean shutdown: explicit death, last window flushed
        assert a.wait(20) == 0, a.stderr.read().decode()
        wait_for(lambda: device_state(db, "dev-a") == ("offline", True), what="dev-a clean death")
        final = _status(a_status)
        assert final.get("closed") and total_requests(db, "dev-a") == final["requests"]
        b.kill()  # no goodbye: the broker publishes dev-b's Will
        b.wait(10)
        wait_for(lambda: device_state(db, "dev-b") == ("offline", False), what="dev-b Will")
        assert q(db, "SELECT session, clean FROM deaths WHERE device='dev-b'") == [(1, 0)]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
    rep = report.build(Store(db))
    states = {d["device"]: (d["state"], d["clean_shutdown"]) for d in rep["devices"]}
    assert states == {"dev-a": ("offline", True), "dev-b": ("offline", False)}
    assert "offline!" in report.render(rep)


def test_broker_restart_every_window_arrives_exactly_once(broker, coord, tmp_path):
    db = coord.store.path
    pub = Publisher(device_config(broker, "dev-a", tmp_path))
    rec = Recorder(pub)
    traffic = Traffic(pub)
    try:
        wait_for(lambda: pub.connected and total_requests(db) > 0, what="first windows")
        broker.stop()  # down for a while; inference and windows go on
        time.sleep(1.2)
        assert not pub.connected
        assert pub.spool.stats()["pending"] >= 3
        broker.start()
        wait_for(lambda: pub.connected, timeout=15, what="device reconnect")
        time.sleep(0.5)
        n = traffic.stop()
        assert pub.flush() and pub.wait_idle(15), pub.status()
    finally:
        traffic.stop()
        pub.close()
    # every window, once (the primary key makes "once" structural; duplicates are counted apart)
    wait_for(lambda: _window_keys(db, "dev-a") == sorted(rec.keys), timeout=15, what="every window")
    assert total_requests(db) == n
    c = counters(db)
    assert c["stored_metrics"] == len(rec.keys)
    assert c.get("historical", 0) >= 3  # the windows made while the broker was down
    flushed = [r[0] for r in q(db, "SELECT seq FROM messages WHERE historical = 1 ORDER BY received")]
    assert flushed == sorted(flushed)  # in the order they were made
    assert q(db, "SELECT MAX(birth_session) FROM devices")[0][0] == 2  # a new session after reconnect


def test_coordinator_killed_mid_stream_loses_nothing(broker, tmp_path):
    db = tmp_path / "fleet.sqlite"
    cfg = tmp_path / "coord.json"
    cfg.write_text(json.dumps({"host": broker.host, "port": broker.port, "username": "coordinator",
                               "password": PASSWORDS["coordinator"], "fleet": FLEET, "db": str(db),
                               "id": f"killme-{tmp_path.name}", "rollup_s": 1}))

    def start():
        p = subprocess.Popen([sys.executable, "-m", "edge.cli", "coordinator", "--config", str(cfg)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:  # subscribed (the broker keeps its session from then on)
            if " online " in line:
                return p
        raise AssertionError(f"coordinator exited: {p.wait()}")

    proc = start()
    pub = Publisher(device_config(broker, "dev-c", tmp_path))
    rec = Recorder(pub)
    traffic = Traffic(pub)
    try:
        wait_for(lambda: db.exists() and total_requests(db) > 0, timeout=20, what="coordinator storing")
        before = total_requests(db)
        assert retained_state(broker, f"killme-{tmp_path.name}") == "online"
        proc.kill()  # mid-stream, maybe mid-transaction
        proc.communicate()
        assert wait_for(lambda: retained_state(broker, f"killme-{tmp_path.name}") == "offline", what="the Will")
        time.sleep(1.0)  # the broker queues for the coordinator's persistent session
        assert total_requests(db) >= before  # what was stored stays stored
        proc = start()
        n = traffic.stop()
        assert pub.flush() and pub.wait_idle(15)
        wait_for(lambda: total_requests(db) == n, timeout=20, what=f"all {n} requests after the restart")
    finally:
        traffic.stop()
        pub.close()
        wait_for(lambda: _window_keys(db, "dev-c") == sorted(rec.keys), what="the last windows")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out


def test_duplicates_are_dropped(broker, coord, tmp_path):
    db = coord.store.path
    with Publisher(device_config(broker, "dev-a", tmp_path)) as pub:
        pub.on_request("tiny", 8, "generic", 0.003)
        assert pub.flush() and pub.wait_idle()
    wait_for(lambda: total_requests(db) == 1, what="window stored")
    (payload,) = q(db, "SELECT payload FROM messages WHERE kind='metrics' AND payload LIKE '%\"count\":1%'")[0]
    raw = make_client(BrokerSettings(host=broker.host, port=broker.port, username="dev-a", password=PASSWORDS["dev-a"]), "dup")
    raw.connect(broker.host, broker.port)
    raw.loop_start()
    for body in (payload, '{"historical":true,' + payload[1:]):  # re-sent as-is and marked historical
        raw.publish(f"edgejit/{FLEET}/dev-a/metrics", body, qos=1).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    wait_for(lambda: counters(db).get("duplicates") == 2, what="2 duplicates counted")
    assert total_requests(db) == 1


def test_malformed_oversized_and_wrong_schema_rejected_and_counted(broker, coord, tmp_path):
    db = coord.store.path
    good = Publisher(device_config(broker, "dev-b", tmp_path), start=False)
    from edge.telemetry import sketch

    sk = sketch.new()
    sk.add(5.0)
    series = {"model": "m", "seq_len": 8, "kind": "generic", "count": 1, "sum_ms": 5.0, "min_ms": 5.0, "max_ms": 5.0,
              "sketch": sketch.encode(sk)}
    header = {"v": 1, "type": "metrics", "fleet": FLEET, "device": "dev-b", "session": 9, "t0": 1.0, "t1": 2.0}
    bad = {
        "malformed": [b"\xff\xfe not utf-8", b"{not json", b"[" * 100000, b'{"v": NaN}'],
        "oversized": [b"{" + b" " * (300 * 1024) + b"}"],
        "schema": [
            b"[]",
            json.dumps({**header, "seq": 1, "v": 2, "series": []}).encode(),  # unknown protocol version
            json.dumps({**header, "seq": 2, "series": [{**series, "kind": "Not A Kind"}]}).encode(),
            json.dumps({**header, "seq": 3, "series": [{**series, "sketch": "!!"}]}).encode(),
            json.dumps({**header, "seq": 4, "series": [{**series, "count": 7}]}).encode(),  # count != sketch
            json.dumps({**header, "seq": -5, "series": []}).encode(),
            json.dumps({**header, "type": "jit", "seq": 6, "series": []}).encode(),
        ],
        "mismatch": [json.dumps({**header, "seq": 7, "device": "dev-a", "series": []}).encode()],
    }
    raw = make_client(BrokerSettings(host=broker.host, port=broker.port, username="dev-b", password=PASSWORDS["dev-b"]), "bad")
    raw.connect(broker.host, broker.port)
    raw.loop_start()
    for payloads in bad.values():
        for p in payloads:
            raw.publish(f"edgejit/{FLEET}/dev-b/metrics", p, qos=1).wait_for_publish(5)
    raw.publish(f"edgejit/{FLEET}/dev-b/metrics", json.dumps({**header, "seq": 8, "series": [series]}), qos=1).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    wait_for(lambda: total_requests(db) == 1, what="the good message after the bad ones")
    c = counters(db)
    assert {k: c.get(f"rejected_{k}", 0) for k in bad} == {k: len(v) for k, v in bad.items()}
    assert c["stored_metrics"] == 1
    reasons = [r[0] for r in q(db, "SELECT reason FROM rejects ORDER BY id")]
    assert reasons == [k for k, v in bad.items() for _ in v]
    good.close()


def test_spool_over_bound_drops_oldest_and_is_reported(broker, coord, tmp_path):
    from deploy.tools.processes import free_port

    db = coord.store.path
    cfg = device_config(broker, "dev-d", tmp_path, spool_max_windows=4, window_s=60)  # windows only on flush
    offline = Publisher({**cfg, "port": free_port()})  # no broker there: everything spools
    for i in range(10):
        offline.on_request("tiny", 8, "generic", 0.001 * (i + 1))
        assert offline.flush()
    offline.close(timeout=0.1)  # closes an 11th (empty) window
    pub = Publisher(cfg)  # the device restarts, now reaching the broker: flushes what is left
    try:
        wait_for(lambda: pub.connected, what="connect")
        assert pub.wait_idle()
        assert pub.spool.stats()["dropped_size"] == 7  # 11 windows, bound 4: the 7 oldest dropped
        pub.on_request("tiny", 8, "generic", 0.5)
        assert pub.flush() and pub.wait_idle()
    finally:
        pub.close()
    wait_for(lambda: len(_window_keys(db, "dev-d")) == 6, what="4 spooled + 2 live windows")
    rows = q(db, "SELECT session, seq, historical FROM messages WHERE kind='metrics' ORDER BY 1, 2")
    assert rows[:4] == [(0, 7, 1), (0, 8, 1), (0, 9, 1), (0, 10, 1)]  # the newest survived, flushed in order
    arrival = [r[0] for r in q(db, "SELECT seq FROM messages WHERE kind='metrics' AND session=0 ORDER BY received")]
    assert arrival == [7, 8, 9, 10]
    assert total_requests(db) == 4
    assert q(db, "SELECT MIN(min_ms), MAX(max_ms), SUM(count) FROM rollups") == [(8.0, 500.0, 4)]  # 8, 9, 10 ms + live
    rep = report.build(Store(db))
    (dev,) = rep["devices"]
    assert dev["spool_dropped"]["size"] == 7 and dev["missing_windows"] == 7


def test_shared_subscription_splits_load_into_one_store(broker, tmp_path):
    db = tmp_path / "shared.sqlite"
    c1 = _coordinator(broker, db, f"s1-{tmp_path.name}", share_group="g1")
    c2 = _coordinator(broker, db, f"s2-{tmp_path.name}", share_group="g1")
    pubs = [Publisher(device_config(broker, d, tmp_path)) for d in ("dev-a", "dev-b")]
    recs = [Recorder(p) for p in pubs]
    try:
        for i in range(300):
            for j, p in enumerate(pubs):
                p.on_request("tiny", 16, "generic", 0.001 * (1 + (i * 7 + j) % 13))
            if i % 30 == 0:
                for p in pubs:
                    p.flush()
        for p in pubs:
            assert p.flush() and p.wait_idle()
        wait_for(lambda: total_requests(db) == 600, what="600 requests")
    finally:
        for p in pubs:
            p.close()
        for c in (c1, c2):
            c.stop()
            c.store.close()
    assert c1.stats["stored"] > 0 and c2.stats["stored"] > 0  # both took a share
    stored = q(db, "SELECT device, session, seq FROM messages WHERE kind='metrics' ORDER BY 1, 2, 3")
    assert stored == sorted([(d, *k) for d, r in zip(("dev-a", "dev-b"), recs) for k in r.keys])
    # the fleet p99 is that of all 600 latencies (merged sketches), within the sketch's 1%
    exact = sorted(1.0 * (1 + (i * 7 + j) % 13) for i in range(300) for j in range(2))
    fleet = report.build(Store(db))["models"]["tiny"]["buckets"][0]
    assert fleet["count"] == 600
    assert abs(fleet["p99_ms"] - exact[int(0.99 * 599)]) <= 0.01 * exact[int(0.99 * 599)]


def test_new_device_warms_up_from_fleet_knowledge(broker, coord, tmp_path):
    veteran = Publisher(device_config(broker, "dev-a", tmp_path))
    try:
        for i in range(400):
            veteran.on_request("tiny", (16, 16, 16, 32, 32, 5)[i % 6] if i % 50 else 200, "generic", 0.001)
        assert veteran.flush() and veteran.wait_idle()
    finally:
        veteran.close()
    hot = wait_for(lambda: coord._published_hot.get("tiny"), what="hot lengths published")
    assert hot[:3] == [16, 32, 5] and 200 not in hot  # 200 is under 5% of the traffic
    got = []
    newcomer = Publisher(device_config(broker, "dev-b", tmp_path / "fresh"))  # empty spool and cache
    newcomer.on_hot_lengths(lambda model, lengths: got.append((model, lengths)))
    try:
        wait_for(lambda: got, what="hot lengths at the new device")
        assert got[0] == ("tiny", hot)  # before any traffic of its own
        assert newcomer.counters["requests"] == 0
    finally:
        newcomer.close()


def test_fleet_cli_report_and_json_export(broker, tmp_path, capsys):
    from edge import cli

    dbs = []
    for i, dev in enumerate(("dev-a", "dev-b")):
        c = _coordinator(broker, tmp_path / f"c{i}.sqlite", f"cli{i}-{tmp_path.name}")
        with Publisher(device_config(broker, dev, tmp_path)) as pub:
            for k in range(50):
                pub.on_request("tiny", 24, "padded" if k % 2 else "variant", 0.001 * (i + 1))
            pub.on_jit("tiny", {"event": "cache_miss", "seq": 24})
            pub.on_jit("tiny", {"event": "compile_finished", "seq": 24, "duration_s": 1.25})
            pub.on_jit("tiny", {"event": "cache_hit", "seq": 24})
            pub.on_jit("tiny", {"event": "cache_hit", "seq": 24})
            assert pub.flush() and pub.wait_idle()
        wait_for(lambda: total_requests(c.store.path) == 50, what="stored")
        wait_for(lambda: q(c.store.path, "SELECT COUNT(*) FROM jit_events")[0][0] == 4, what="jit stored")
        c.stop()
        c.store.close()
        dbs.append(str(tmp_path / f"c{i}.sqlite"))
    out_json = tmp_path / "fleet.json"
    out_svg = tmp_path / "fleet.svg"
    assert cli.main(["fleet", "--db", dbs[0], "--db", dbs[1], "--json", str(out_json), "--svg", str(out_svg)]) == 0
    text = capsys.readouterr().out
    assert "2 devices (0 online, 2 offline)" in text and "17-32" in text and "cache hit rate 67%" in text
    rep = json.loads(out_json.read_text())
    (b,) = rep["models"]["tiny"]["buckets"]
    assert b["count"] == 100 and b["kinds"] == {"padded": 50, "variant": 50}
    assert b["devices"]["dev-a"]["p50_ms"] == pytest.approx(1.0, rel=0.01)
    assert b["devices"]["dev-b"]["p50_ms"] == pytest.approx(2.0, rel=0.01)
    assert rep["models"]["tiny"]["jit"]["compile_p50_s"] == 1.25
    import xml.etree.ElementTree as ET

    titles = [e.text for e in ET.parse(out_svg).iter("{http://www.w3.org/2000/svg}title")]
    assert "dev-b p50 1.99 ms (n=50)" in titles and "dev-a p50 0.99 ms (n=50)" in titles  # sketch values, 1%
    assert cli.main(["fleet", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert "no such coordinator database" in capsys.readouterr().err


def test_rebirth_when_a_coordinator_comes_online_and_on_request(broker, tmp_path):
    pub = Publisher(device_config(broker, "dev-b", tmp_path, window_s=60))  # no windows unless flushed
    try:
        wait_for(lambda: pub.connected, what="device connected")
        time.sleep(0.3)  # its first birth went to nobody
        c = _coordinator(broker, tmp_path / "late.sqlite", f"late-{tmp_path.name}")
        try:
            db = c.store.path
            # the device saw the coordinator's state turn online and re-sent its birth
            wait_for(lambda: device_state(db, "dev-b") == ("online", None), what="birth after coordinator start")
            births = pub.counters["births"]
            con = sqlite3.connect(db, timeout=30)
            with con:
                con.execute("UPDATE devices SET birth = NULL, birth_session = NULL")  # the coordinator lost it
            con.close()
            pub.on_request("tiny", 8, "generic", 0.001)
            assert pub.flush()  # a window from a device the coordinator does not know -> rebirth request
            wait_for(lambda: pub.counters["births"] > births, what="rebirth requested by the coordinator")
            wait_for(lambda: device_state(db, "dev-b") == ("online", None), what="birth stored again")
        finally:
            c.stop()
            c.store.close()
    finally:
        pub.close()
