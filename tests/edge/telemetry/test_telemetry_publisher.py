"""The device publisher against a real Mosquitto (auth + per-device ACL), observed by a raw
MQTT subscriber logged in as the coordinator."""

from __future__ import annotations

import json
import queue
import time
from types import SimpleNamespace

import pytest

from edge.telemetry import Publisher, TelemetryConfig, TelemetryError, sketch
from edge.telemetry.mqtt import make_client
from tests.mqtt import FLEET, PASSWORDS, coordinator_settings, device_config, needs_mosquitto, start_broker, wait_for

pytestmark = needs_mosquitto


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.close()


class Watcher:
    """A raw subscriber (coordinator credentials) collecting (topic, json body, retain)."""

    def __init__(self, broker, topic=f"edgejit/{FLEET}/#"):
        self.q = queue.Queue()
        self.client = make_client(coordinator_settings(broker), f"watcher-{time.monotonic_ns()}")
        self.client.on_message = lambda _c, _u, m: self.q.put((m.topic, m.payload, m.retain))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(1)
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        subscribed.get(timeout=5)

    def take(self, pred, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, payload, retain = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            if pred(topic, body):
                return topic, body
        raise AssertionError("expected message did not arrive")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class FakeArtifact:
    name = "tiny-gpt2"
    model_sha256 = "ab" * 32
    precision = "int8"
    manifest = SimpleNamespace(target=SimpleNamespace(to_json=lambda: {"preset": "x86-avx2", "tvm": {"kind": "llvm"}}))


def test_birth_windows_and_clean_death(broker, tmp_path):
    w = Watcher(broker)
    pub = Publisher(device_config(broker, "dev-a", tmp_path), models=[FakeArtifact()], policy={"min_count": 3})
    try:
        topic, birth = w.take(lambda t, b: t.endswith("/dev-a/birth"))
        assert topic == f"edgejit/{FLEET}/dev-a/birth"
        assert birth["v"] == 1 and birth["session"] == 1 and birth["seq"] == 0
        assert birth["models"] == [{"name": "tiny-gpt2", "sha256": "ab" * 32, "precision": "int8",
                                    "target": {"preset": "x86-avx2", "tvm": {"kind": "llvm"}}}]
        assert birth["policy"] == {"min_count": 3}
        assert birth["host"]["cores"] >= 1 and birth["host"]["arch"] and birth["host"]["os"]
        assert birth["versions"]["tvm"] and birth["sketch"]["type"] == "ddsketch"
        latencies = [0.001 * (1 + i % 10) for i in range(200)]
        for v in latencies:
            pub.on_request("tiny-gpt2", 16, "variant", v)
        pub.on_jit("tiny-gpt2", {"event": "compile_finished", "seq": 16, "duration_s": 2.5})
        _, m = w.take(lambda t, b: t.endswith("/metrics") and b["series"])
        assert (m["session"], m["seq"]) == (1, m["seq"]) and m["seq"] >= 1 and "historical" not in m
        (s,) = m["series"]
        assert (s["model"], s["seq_len"], s["kind"], s["count"]) == ("tiny-gpt2", 16, "variant", 200)
        assert s["max_ms"] == pytest.approx(10.0) and s["min_ms"] == pytest.approx(1.0)
        p50 = sketch.quantiles(sketch.decode(s["sketch"]))[0]
        assert abs(p50 - sorted(x * 1000 for x in latencies)[99]) <= 0.01 * p50
        _, j = w.take(lambda t, b: t.endswith("/jit"))
        assert j["events"][0] == {"model": "tiny-gpt2", "event": "compile_finished", "t": j["events"][0]["t"],
                                  "seq_len": 16, "duration_s": 2.5}
    finally:
        pub.close()
    _, death = w.take(lambda t, b: t.endswith("/dev-a/death"))
    assert death == {**death, "session": 1, "clean": True}
    assert pub.spool.path.exists()
    w.close()


def test_listener_calls_never_block_while_broker_is_unreachable(tmp_path):
    from deploy.tools.processes import free_port

    cfg = {"port": free_port(), "device_id": "dev-x", "fleet": FLEET, "window_s": 0.05,
           "spool_path": str(tmp_path / "s.sqlite"), "reconnect_min_s": 0.05, "reconnect_max_s": 0.1}
    pub = Publisher(cfg)
    worst = 0.0
    t0 = time.perf_counter()
    for i in range(20000):
        t = time.perf_counter()
        pub.on_request("m", 8, "generic", 0.001)
        worst = max(worst, time.perf_counter() - t)
    total = time.perf_counter() - t0
    assert total < 1.0, total  # ~1 us per call; inference never waits for telemetry
    wait_for(lambda: pub.counters["requests"] == 20000, what="worker to aggregate")
    pub.flush()
    assert not pub.connected and pub.spool.stats()["pending"] >= 1
    pub.close(timeout=0.2)


def test_a_device_cannot_publish_as_another(broker, tmp_path):
    w = Watcher(broker)
    # dev-a's credentials, claiming to be dev-b: the broker's ACL refuses every message
    pub = Publisher(device_config(broker, "dev-b", tmp_path, login="dev-a"))
    try:
        pub.on_request("m", 8, "generic", 0.001)
        wait_for(lambda: pub.spool.stats()["dropped_refused"] >= 2, what="refused PUBACKs")
        # a raw publish is refused too (MQTT v5 PUBACK reason 'Not authorized')
        raw = make_client(type(coordinator_settings(broker))(host=broker.host, port=broker.port, username="dev-a",
                                                             password=PASSWORDS["dev-a"]), "raw-dev-a")
        acks = queue.Queue()
        raw.on_publish = lambda _c, _u, mid, rc, _p: acks.put(rc)
        raw.connect(broker.host, broker.port)
        raw.loop_start()
        raw.publish(f"edgejit/{FLEET}/dev-b/metrics", b"{}", qos=1)
        assert acks.get(timeout=5).is_failure
        raw.publish(f"edgejit/{FLEET}/dev-a/metrics", b'{"own": 1}', qos=1)
        assert not acks.get(timeout=5).is_failure
        raw.disconnect()
        raw.loop_stop()
        _, body = w.take(lambda t, b: True)
        assert body == {"own": 1}  # nothing of the impostor's reached subscribers
    finally:
        pub.close(timeout=0.5)
        w.close()


def test_new_device_receives_retained_hot_lengths(broker, tmp_path):
    coord = make_client(coordinator_settings(broker), "hot-publisher")
    coord.connect(broker.host, broker.port)
    coord.loop_start()
    body = {"v": 1, "type": "hot", "model": "tiny-gpt2", "lengths": [16, 32, 7], "ts": time.time()}
    coord.publish(f"edgejit/{FLEET}/_coordinator/hot/tiny-gpt2", json.dumps(body), qos=1, retain=True).wait_for_publish(5)
    got = queue.Queue()
    pub = Publisher(device_config(broker, "dev-c", tmp_path))
    pub.on_hot_lengths(lambda model, lengths: got.put((model, lengths)))
    try:
        assert got.get(timeout=10) == ("tiny-gpt2", [16, 32, 7])
        # an update replaces them; a late registration gets what is known at once
        body["lengths"] = [64]
        coord.publish(f"edgejit/{FLEET}/_coordinator/hot/tiny-gpt2", json.dumps(body), qos=1, retain=True)
        assert got.get(timeout=10) == ("tiny-gpt2", [64])
        late = queue.Queue()
        pub.on_hot_lengths(lambda model, lengths: late.put((model, lengths)))
        assert late.get(timeout=5) == ("tiny-gpt2", [64])
    finally:
        pub.close(timeout=0.5)
        coord.publish(f"edgejit/{FLEET}/_coordinator/hot/tiny-gpt2", b"", qos=1, retain=True).wait_for_publish(5)
        coord.disconnect()
        coord.loop_stop()


def test_rebirth_on_request(broker, tmp_path):
    w = Watcher(broker)
    pub = Publisher(device_config(broker, "dev-d", tmp_path))
    try:
        _, first = w.take(lambda t, b: t.endswith("/dev-d/birth"))
        w.client.publish(f"edgejit/{FLEET}/_coordinator/rebirth/dev-d", json.dumps({"v": 1, "type": "rebirth"}), qos=1)
        _, again = w.take(lambda t, b: t.endswith("/dev-d/birth"))
        assert again["session"] == first["session"] and again["seq"] > first["seq"]
    finally:
        pub.close(timeout=0.5)
        w.close()


@pytest.mark.parametrize("cfg, match", [
    ({"device_id": "_x"}, "device_id"),
    ({"device_id": "a/b"}, "device_id"),
    ({"protocol": "4"}, "protocol"),
    ({"colour": 1}, "unknown keys"),
    ({"prefix": "a/#"}, "prefix"),
])
def test_bad_config_is_a_clear_error(cfg, match):
    with pytest.raises(TelemetryError, match=match):
        TelemetryConfig.from_dict(cfg)


def test_tls_settings_must_exist(tmp_path):
    from edge.telemetry.mqtt import BrokerSettings

    with pytest.raises(TelemetryError, match="ca_file"):
        make_client(BrokerSettings(tls={"ca_file": str(tmp_path / "nope.pem")}), "x")



def test_tls_with_password(tmp_path):
    from deploy.fleet.broker import Broker

    with Broker(tmp_path / "tls-broker", users=PASSWORDS, tls=True) as b:
        w_cfg = device_config(b, "dev-a", tmp_path, tls={"ca_file": str(b.ca_file)})
        pub = Publisher(w_cfg)
        try:
            wait_for(lambda: pub.connected, what="TLS connect")
            pub.on_request("m", 8, "generic", 0.002)
            assert pub.flush() and pub.wait_idle(), pub.status()
        finally:
            pub.close(timeout=0.5)
        # without the CA the server certificate is not trusted: never connects
        bad = Publisher(device_config(b, "dev-b", tmp_path, tls={"insecure": False}))  # system CAs only
        time.sleep(0.5)
        assert not bad.connected
        bad.close(timeout=0.1)
