"""Generation telemetry end to end: a real `edgejit daemon` serving SmolLM2 publishes to a real
Mosquitto, a coordinator merges, and the fleet report's time to first token and decode tokens/s
(p50, p99) match what the openai client measured on its side of the same streamed requests
within the sketch's 1% plus the HTTP transport (a few ms on loopback). /metrics has the same
requests in its histograms."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from deploy.fleet.coordinator import Coordinator, Store, report
from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config
from tests.mqtt import FLEET, coordinator_settings, device_config, needs_mosquitto, start_broker, wait_for

openai = pytest.importorskip("openai")

pytestmark = [needs_mosquitto, pytest.mark.slow]

PROMPTS = ["Name three rivers in Africa.", "What is a haiku?", "Why is the sky blue? Explain briefly to a child.",
           "Give me a tip for sleeping well."]
N_TOKENS = 12
# What the client's clock holds beyond the daemon's: building and sending the request, reading and
# parsing the chunk, and, on a busy 2-core machine, waiting to be scheduled (measured 2-90 ms here
# while other jobs ran). A bound, not the expected gap.
TRANSPORT_S = 0.100


def lower(values, q):
    return float(np.quantile(np.asarray(values), q, method="lower"))


def test_daemon_generation_telemetry_matches_client_measurements(smollm2_artifact, tmp_path):
    broker = start_broker(tmp_path / "broker")
    store = Store(tmp_path / "fleet.sqlite", rollup_s=3600.0)
    coord = Coordinator(coordinator_settings(broker), store, fleet=FLEET, coordinator_id="gen-daemon", session_expiry_s=60).start()
    port = free_port()
    tel = {"enabled": True, **device_config(broker, "dev-a", tmp_path, window_s=0.5, sample_s=0.1)}
    cfg = write_config(tmp_path / "daemon.toml", {"smol": smollm2_artifact}, server={"port": port},
                       generation={"max_seqs": 2, "max_queue": 8}, telemetry=tel)
    daemon = DaemonProcess(cfg, port, tmp_path / "daemon.log").start(wait_ready=300)
    measured = []
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        lock = threading.Lock()

        def user(k):
            for i in range(3):
                t0 = time.perf_counter()
                stamps = []
                stream = client.chat.completions.create(
                    model="smol", messages=[{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}],
                    max_tokens=N_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                usage = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        stamps.append(time.perf_counter())
                    if chunk.usage is not None:
                        usage = chunk.usage
                with lock:
                    measured.append((stamps[0] - t0, (usage.completion_tokens - 1) / (stamps[-1] - stamps[0]), usage.completion_tokens))

        threads = [threading.Thread(target=user, args=(k,)) for k in range(3)]  # max_seqs 2: one waits
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(measured) == 9 and all(n == N_TOKENS for *_, n in measured), measured
        m = daemon.metrics()
        assert sum_samples(m, "edgejit_generation_inter_token_seconds_count", model="smol") == 9
        assert sum_samples(m, "edgejit_generation_decode_tokens_per_second_count", model="smol") == 9
        assert sum_samples(m, "edgejit_generation_kv_tokens_in_use", model="smol") == 0  # every sequence freed
        assert "edgejit_generation_kv_bytes_in_use{model=\"smol\"}" in m
        assert daemon.stop() == 0, daemon.log()
        wait_for(lambda: store.db.execute("SELECT death_session FROM devices WHERE device='dev-a'").fetchone() not in (None, (None,)),
                 timeout=20, what="the daemon's death stored")
    finally:
        daemon.stop()
        coord.stop()
        broker.close()
    rep = report.build(store)
    (artifact_name,) = [k for k, v in rep["models"].items() if v.get("generation")]
    g = rep["models"][artifact_name]["generation"]
    assert g["requests"] == 9 and g["completion_tokens"] == 9 * N_TOKENS and g["finish"] == {"length": 9}
    ttft = [t for t, _, _ in measured]
    tok_s = [r for _, r, _ in measured]
    print(f"TTFT client p50 {lower(ttft, 0.5) * 1e3:.1f} ms, report {g['ttft_ms']['p50']:.1f}; client p99 "
          f"{lower(ttft, 0.99) * 1e3:.1f} ms, report {g['ttft_ms']['p99']:.1f}; tok/s client p50 {lower(tok_s, 0.5):.2f}, "
          f"report {g['tok_s']['p50']:.2f}; client p99 {lower(tok_s, 0.99):.2f}, report {g['tok_s']['p99']:.2f}")
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        client_ttft = lower(ttft, q) * 1e3
        # the server's clock starts after the request is read and stops before the chunk is written
        assert client_ttft * 0.99 - TRANSPORT_S * 1e3 <= g["ttft_ms"][name] <= client_ttft * 1.01, (name, g["ttft_ms"], ttft)
        client_rate = lower(tok_s, q)
        span = (N_TOKENS - 1) / client_rate
        assert g["tok_s"][name] == pytest.approx(client_rate, rel=0.01 + TRANSPORT_S / span), (name, g["tok_s"], tok_s)
    assert g["running"]["max"] == 2 and g["kv_bytes"]["max"] > 0 and g["queued"]["count"] >= 1
    text = report.render(rep)
    assert "time to first token" in text and "decode tokens/s" in text
    print(text)
    store.close()
