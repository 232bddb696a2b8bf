"""A real edge.Runtime (the tiny compiled encoder) reporting through the publisher to the
coordinator over a real Mosquitto: what the fleet report says is what the runtime measured."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

import edge
from deploy.fleet.coordinator import Coordinator, Store, report
from edge.telemetry import Publisher
from tests.fixtures import handmade
from tests.mqtt import FLEET, coordinator_settings, device_config, needs_mosquitto, start_broker, wait_for

pytestmark = needs_mosquitto


class Recording:
    def __init__(self):
        self.calls = []

    def on_request(self, model, seq_len, kind, latency_s):
        self.calls.append((model, seq_len, kind, latency_s))

    def on_jit(self, model, event):
        pass


def test_runtime_latencies_reach_the_fleet_report(tiny_artifact, tiny_onnx, tmp_path):
    with start_broker(tmp_path / "broker") as broker:
        store = Store(tmp_path / "fleet.sqlite")
        coord = Coordinator(coordinator_settings(broker), store, fleet=FLEET, coordinator_id="rt").start()
        rec = Recording()
        with edge.Runtime(tiny_artifact, threads=1) as rt:
            pub = Publisher(device_config(broker, "dev-a", tmp_path), models=[rt], policy={"mode": "none"})
            rt.add_listener(pub)
            rt.add_listener(rec)
            ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
            try:
                for i in range(90):
                    seq = (7, 64, 100)[i % 3]
                    x = handmade.inputs(1, seq, seed=i)
                    out = rt.run(x)
                    if i < 3:
                        np.testing.assert_allclose(out[0], ref.run(None, x)[0], rtol=1e-4, atol=1e-4)
                assert pub.flush() and pub.wait_idle()
            finally:
                pub.close()
            wait_for(lambda: coord.stats["death"] == 1, what="the device's death")
            coord.stop()
            name, sha = rt.artifact.name, rt.artifact.model_sha256
        rep = report.build(store)
        store.close()
    (dev,) = rep["devices"]
    assert (dev["device"], dev["state"], dev["clean_shutdown"], dev["models"]) == ("dev-a", "offline", True, [name])
    birth = json.loads(Store(tmp_path / "fleet.sqlite").db.execute("SELECT birth FROM devices").fetchone()[0])
    assert birth["models"][0]["sha256"] == sha and birth["policy"] == {"mode": "none"}
    buckets = {b["bucket"]: b for b in rep["models"][name]["buckets"]}
    assert set(buckets) == {"5-8", "33-64", "65-128"}
    for label, seq in (("5-8", 7), ("33-64", 64), ("65-128", 100)):
        measured = np.sort([c[3] * 1000 for c in rec.calls if c[1] == seq])
        b = buckets[label]
        assert b["count"] == len(measured) == 30 and b["kinds"] == {"generic": 30}
        for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
            exact = measured[int(q * (len(measured) - 1))]
            assert abs(b[key] - exact) <= 0.0101 * exact, (label, key, b[key], exact)
