"""Benchmark: what fleet telemetry costs on the device and what one coordinator can take.

  1. listener call: the time `Publisher.on_request` adds to each inference (the only telemetry
     work on the inference thread), broker unreachable.
  2. device worker: requests aggregated per second into DDSketches (the telemetry thread).
  3. coordinator ingest: metrics windows (10 series of 50 requests each) validated, de-duplicated
     and merged into the SQLite rollups per second, in-process (no broker).
  4. end to end: the same windows from 4 device clients -> Mosquitto -> coordinator (manual
     PUBACK after commit); windows stored per second, every window accounted for.

    python bench/bench_telemetry.py            # ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402


def listener_cost(tmp: Path, n: int) -> float:
    from deploy.tools.processes import free_port
    from edge.telemetry import Publisher

    pub = Publisher({"port": free_port(), "device_id": "bench", "window_s": 3600, "spool_path": str(tmp / "l.sqlite")})
    per_call = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(n):
            pub.on_request("m", 16, "generic", 0.001)
        per_call.append((time.perf_counter() - t) / n * 1e9)
    while pub.counters["requests"] < 5 * n:
        time.sleep(0.005)
    pub.close(timeout=0.1)
    return float(np.median(per_call))


def worker_rate(tmp: Path, n: int) -> float:
    from edge.telemetry import Publisher

    pub = Publisher({"port": 1, "device_id": "bench", "window_s": 3600, "spool_path": str(tmp / "w.sqlite")}, start=False)
    rng = np.random.default_rng(0)
    lat = rng.lognormal(-6, 0.5, n)
    lens = rng.integers(1, 256, n)
    t = time.perf_counter()
    for i in range(n):
        pub._handle(("request", "m", int(lens[i]), "generic", float(lat[i])))
    pub._close_window()
    rate = n / (time.perf_counter() - t)
    pub.close()
    return rate


def windows(n_windows: int, devices: int, n_series: int = 10) -> list[tuple[str, bytes]]:
    """Valid metrics windows as a device would send them: n_series lengths x 50 requests each."""
    from edge.telemetry import sketch

    rng = np.random.default_rng(1)
    out = []
    for w in range(n_windows):
        series = []
        for n in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)[:n_series]:
            sk = sketch.new()
            vals = rng.lognormal(np.log(n / 10), 0.3, 50)
            for v in vals:
                sk.add(float(v))
            series.append({"model": "m", "seq_len": n, "kind": "generic", "count": 50, "sum_ms": float(vals.sum()),
                           "min_ms": float(vals.min()), "max_ms": float(vals.max()), "sketch": sketch.encode(sk)})
        dev = f"dev-{w % devices}"
        body = {"v": 1, "type": "metrics", "fleet": "f", "device": dev, "session": 1, "seq": w, "t0": 1e9 + w,
                "t1": 1e9 + w + 10, "series": series}
        out.append((f"edgejit/f/{dev}/metrics", json.dumps(body).encode()))
    return out


def ingest_rate(tmp: Path, n_windows: int, devices: int = 20) -> float:
    from deploy.fleet.coordinator import Store, validate

    payloads = windows(n_windows, devices)
    store = Store(tmp / "ingest.sqlite")
    t = time.perf_counter()
    for topic, p in payloads:
        store.ingest(validate.parse("edgejit", topic, p))
    rate = n_windows / (time.perf_counter() - t)
    store.close()
    return rate


def end_to_end(tmp: Path, n_windows: int, devices: int = 4) -> tuple[float, int, int]:
    """Devices' windows (sent by one paho client per device, QoS 1) through Mosquitto into the
    coordinator (validate, store, commit, then PUBACK)."""
    from deploy.fleet.broker import Broker
    from deploy.fleet.coordinator import Coordinator, Store
    from edge.telemetry import BrokerSettings
    from edge.telemetry.mqtt import make_client

    users = {"coordinator": "c", **{f"dev-{i}": f"p{i}" for i in range(devices)}}
    payloads = windows(n_windows, devices)
    with Broker(tmp / "broker", users=users) as b:
        store = Store(tmp / "e2e.sqlite")
        coord = Coordinator(BrokerSettings(port=b.port, username="coordinator", password="c"), store, fleet="f").start()
        clients = []
        for i in range(devices):
            c = make_client(BrokerSettings(port=b.port, username=f"dev-{i}", password=f"p{i}"), f"bench-{i}")
            c.max_inflight_messages_set(100)
            c.connect(b.host, b.port)
            c.loop_start()
            clients.append(c)
        t = time.perf_counter()
        for k, (topic, p) in enumerate(payloads):
            clients[k % devices].publish(topic, p, qos=1)
        while coord.stats["stored"] < n_windows:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t
        for c in clients:
            c.disconnect()
            c.loop_stop()
        coord.stop()
        stored = store.db.execute("SELECT COUNT(*) FROM messages WHERE kind='metrics'").fetchone()[0]
        requests = store.db.execute("SELECT SUM(count) FROM rollups").fetchone()[0]
        store.close()
    return n_windows / elapsed, stored, requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "telemetry.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        call_ns = listener_cost(tmp, 20000)
        agg = worker_rate(tmp, 50000)
        ing = ingest_rate(tmp, 1000)
        e2e, stored, requests = end_to_end(tmp, 1000)
    rows = [
        "| measurement | result |",
        "| --- | --- |",
        f"| `on_request` on the inference thread (median of 5 x 20000 calls) | {call_ns:.0f} ns per call |",
        f"| device worker aggregation into DDSketches (50000 requests, 255 lengths) | {agg:,.0f} requests/s |",
        f"| coordinator ingest, in-process (1000 windows x 10 series x 50 requests, 20 devices) | {ing:,.0f} windows/s |",
        f"| end to end via Mosquitto, 1000 such windows from 4 device clients (QoS 1, PUBACK after commit) "
        f"| {e2e:,.0f} windows/s; {stored} stored, {requests} requests |",
    ]
    body = "\n".join(rows) + (
        "\n\nA device sends one metrics window per `window_s` (10 s), so ingest of N windows/s keeps up with about "
        "10 x N devices on one coordinator process (more via shared subscriptions).")
    write_results(Path(args.out), "Fleet telemetry costs", body)


if __name__ == "__main__":
    main()
