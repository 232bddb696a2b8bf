"""Text-generation telemetry through a real Mosquitto: two publishers report per-request time to
first token, inter-token latency and decode tokens/s plus sampled engine gauges (queue, running
sequences, KV bytes, prefix-cache counts); the coordinator merges them; the fleet report's
percentiles equal the exact ones of the values fed in, within DDSketch's 1% relative error.
The same path from a real daemon serving SmolLM2, checked against what the openai client measured:
tests/deploy/test_coordinator_generation_daemon.py."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest

from deploy.fleet.coordinator import Coordinator, Store, report
from deploy.fleet.coordinator.plot import svg
from edge.telemetry import Publisher
from tests.mqtt import FLEET, coordinator_settings, device_config, needs_mosquitto, start_broker, wait_for

pytestmark = needs_mosquitto


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.close()


def exact(values, q):
    """The rank DDSketch reports (the element at floor(q * (n - 1)))."""
    return float(np.quantile(np.asarray(values), q, method="lower"))


class Engine:
    """Gauges as GenerationModel.gauges() returns them, moving on every sample."""

    def __init__(self, prefix: bool):
        self.n, self.prefix = 0, prefix

    def __call__(self):
        self.n += 1
        out = {"queued": self.n % 3, "running": 1 + self.n % 2, "kv_bytes": 46080 * (10 * self.n)}
        if self.prefix:
            out.update(prefix_hits=3 * self.n, prefix_lookups=4 * self.n)
        return out


def test_generation_windows_merge_into_the_fleet_report(broker, tmp_path):
    store = Store(tmp_path / "fleet.sqlite", rollup_s=1.0)
    coord = Coordinator(coordinator_settings(broker), store, fleet=FLEET, coordinator_id="gen", session_expiry_s=60).start()
    rng = np.random.default_rng(0)
    fed = {}
    try:
        for dev, scale in (("dev-a", 1.0), ("dev-b", 2.0)):
            engine = Engine(prefix=dev == "dev-a")
            with Publisher(device_config(broker, dev, tmp_path, sample_s=0.05)) as pub:
                pub.add_generation_source("smollm2", engine)
                stats = [SimpleNamespace(prompt_tokens=int(rng.integers(10, 200)), completion_tokens=int(rng.integers(2, 40)),
                                         ttft_s=scale * float(rng.uniform(0.05, 0.5)), decode_s=scale * float(rng.uniform(0.2, 2.0)),
                                         finish_reason=("stop", "length")[i % 2]) for i in range(60)]
                stats.append(SimpleNamespace(prompt_tokens=5, completion_tokens=0, ttft_s=0.0, decode_s=0.0, finish_reason="cancelled"))
                for st in stats:
                    pub.on_generation("smollm2", st)
                wait_for(lambda: engine.n >= 5, what="gauges sampled")
                assert pub.flush() and pub.wait_idle()
            fed[dev] = stats, engine.n
        wait_for(lambda: store.db.execute("SELECT COUNT(DISTINCT device) FROM gen_counts").fetchone()[0] == 2, what="stored")
        wait_for(lambda: all(store.db.execute("SELECT death_session FROM devices WHERE device=?", (d,)).fetchone()[0] for d in fed),
                 what="deaths stored")
    finally:
        coord.stop()
    rep = report.build(store)
    g = rep["models"]["smollm2"]["generation"]
    every = [st for stats, _ in fed.values() for st in stats]
    done = [st for st in every if st.completion_tokens >= 1]
    assert g["requests"] == 122 and g["prompt_tokens"] == sum(st.prompt_tokens for st in every)
    assert g["completion_tokens"] == sum(st.completion_tokens for st in every)
    assert g["finish"] == {"stop": 60, "length": 60, "cancelled": 2}
    ttft = [st.ttft_s * 1e3 for st in done]
    tok_s = [(st.completion_tokens - 1) / st.decode_s for st in done if st.completion_tokens >= 2]
    itl = [st.decode_s * 1e3 / (st.completion_tokens - 1) for st in done if st.completion_tokens >= 2]
    for key, values in (("ttft_ms", ttft), ("tok_s", tok_s), ("itl_ms", itl)):
        assert g[key]["count"] == len(values)
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            assert g[key][name] == pytest.approx(exact(values, q), rel=0.01), (key, name)
        assert g[key]["max"] == pytest.approx(max(values))
    for dev, (stats, _) in fed.items():
        d = g["devices"][dev]
        assert d["ttft_ms"]["p50"] == pytest.approx(exact([st.ttft_s * 1e3 for st in stats if st.completion_tokens], 0.5), rel=0.01)
    # sampled gauges: every sample of both engines (dev-b's source has no prefix cache)
    n_a, n_b = fed["dev-a"][1], fed["dev-b"][1]
    assert g["running"]["count"] == n_a + n_b and g["running"]["max"] == 2
    assert g["kv_bytes"]["max"] == 46080 * 10 * max(n_a, n_b)
    assert g["devices"]["dev-a"]["prefix_hits"] == 3 * n_a and g["devices"]["dev-a"]["prefix_lookups"] == 4 * n_a
    assert g["prefix_hit_rate"] == pytest.approx(0.75) and g["devices"]["dev-b"]["prefix_lookups"] is None

    text = report.render(rep)
    assert "generation: 122 requests" in text and "time to first token" in text and "decode tokens/s" in text
    assert "prefix cache: hit rate 75%" in text and "KV cache in use" in text and "dev-b" in text
    json.dumps(rep)  # the --json export
    titles = [e.text for e in ET.fromstring(svg(rep)).iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith("p99 ") and t.endswith(" tok/s") for t in titles)
    assert any(t.startswith("dev-a p50 ") and " ms (n=" in t for t in titles)
    store.close()
