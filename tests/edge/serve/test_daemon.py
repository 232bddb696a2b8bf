"""The daemon end to end: a real `edgejit daemon` process over HTTP, results checked against
edge.Runtime in this process (itself checked against ONNX Runtime in test_runtime.py)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edge
from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config
from tests.fixtures import handmade

# In-process compiles (no worker process start-up) keep the test short; the worker is tested in
# test_compile_worker.py and used by the demo.
JIT = {"policy": "on", "buckets": "pow2", "min_bucket": 4, "min_hits": 2, "max_variants": 6, "backoff_s": 1.0, "isolate": False}


@pytest.fixture(scope="module")
def reference(tiny_artifact):
    with edge.Runtime(tiny_artifact) as rt:
        yield rt


def start(tmp_path, models, *, server=None, jit=JIT, log="info"):
    port = free_port()
    cfg = write_config(
        tmp_path / "daemon.toml", models, server={"port": port, **(server or {})}, jit=jit,
        paths={"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")}, log=log,
    )
    return DaemonProcess(cfg, port, tmp_path / "daemon.log").start()


@pytest.fixture(scope="module")
def daemon(tiny_artifact, tmp_path_factory):
    d = start(tmp_path_factory.mktemp("daemon"), {"tiny": tiny_artifact}, server={"max_body_mb": 0.05})
    yield d
    assert d.stop() == 0, d.log()


def assert_same(got: dict, want: list, specs, rtol=1e-5):
    assert sorted(got) == sorted(s.name for s in specs)
    for spec, w in zip(specs, want):
        np.testing.assert_allclose(got[spec.name], w, rtol=rtol, atol=1e-5, err_msg=spec.name)


def test_health_and_models(daemon, tiny_artifact):
    status, doc = daemon.get("/health")
    assert status == 200 and doc["status"] == "ok" and doc["models"] == {"tiny": "ready"}
    status, doc = daemon.get("/v1/models")
    (m,) = doc["models"]
    assert m["name"] == "tiny" and m["state"] == "ready" and m["artifact"] == str(tiny_artifact)
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert m["max_seq"] == 128 and m["jit"]["mode"] == "on"


@pytest.mark.parametrize("npz", [False, True], ids=["json", "npz"])
def test_results_equal_python_runtime(daemon, reference, npz):
    for batch, seq in [(1, 1), (1, 9), (2, 33), (3, 128)]:
        inputs = handmade.inputs(batch, seq, seed=seq)
        inputs["attention_mask"][:, seq // 2 + 1:] = 0  # a padded batch, as tokenizers send it
        status, got, headers = daemon.infer("tiny", inputs, npz=npz)
        assert status == 200, got
        assert headers["X-Edgejit-Module"] in ("generic", "variant", "padded")
        assert_same(got, reference.run(inputs), reference.outputs)


def test_missing_mask_is_filled_with_ones(daemon, reference):
    ids = handmade.inputs(1, 5)["input_ids"]
    status, got, _ = daemon.infer("tiny", {"input_ids": ids})
    assert status == 200
    assert_same(got, reference.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}), reference.outputs)


def _post(daemon, body: bytes, ctype="application/json", model="tiny"):
    status, _, data = daemon.request("POST", f"/v1/models/{model}/infer", body, {"Content-Type": ctype})
    doc = json.loads(data)
    assert set(doc) == {"error", "status"} and doc["status"] == status and "\n" not in doc["error"], (body[:80], doc)
    return status, doc["error"]


def test_bad_requests_get_4xx_with_a_clear_message(daemon, reference):
    ids = [[1, 2, 3]]
    cases = [
        (b'{"inputs": {"input_ids": [[1, 2', 400, "malformed JSON"),
        (b'[1, 2, 3]', 400, '{"inputs"'),
        (json.dumps({"inputs": {"input_ids": [1, 2, 3]}}).encode(), 400, "rank"),  # wrong rank
        (json.dumps({"inputs": {"input_ids": ids, "attention_mask": [[1, 1]]}}).encode(), 400, "'seq'"),  # shapes disagree
        (json.dumps({"inputs": {"input_ids": [[1, 2], [3]]}}).encode(), 400, "rectangular"),
        (json.dumps({"inputs": {"input_ids": [[1.5, 2.0]]}}).encode(), 400, "expected integers"),  # dtype
        (json.dumps({"inputs": {"input_ids": [["a"]]}}).encode(), 400, "numbers"),
        (json.dumps({"inputs": {"token": ids}}).encode(), 400, "unknown input 'token'"),
        (json.dumps({"inputs": {"input_ids": [[1] * 129]}}).encode(), 400, "outside the model's range"),
        (json.dumps({"inputs": {"input_ids": [[1, 64]]}}).encode(), 400, "beyond the vocabulary"),
        (b"\xff\xfe garbage", 400, "malformed JSON"),
    ]
    for body, want_status, want_text in cases:
        status, error = _post(daemon, body)
        assert (status, want_text in error) == (want_status, True), (body[:60], status, error)

    import io

    buf = io.BytesIO()
    np.savez(buf, input_ids=np.array(ids, dtype=np.int32))  # npz with the wrong dtype
    status, error = _post(daemon, buf.getvalue(), "application/x-npz")
    assert status == 400 and "dtype int32, expected int64" in error
    status, error = _post(daemon, b"PK\x03\x04 not a zip", "application/x-npz")
    assert status == 400 and "npz" in error

    status, error = _post(daemon, b'{"inputs": {"input_ids": [[1]]}}', model="nope")
    assert status == 404 and "no model named 'nope'" in error

    status, error = _post(daemon, json.dumps({"inputs": {"input_ids": [[1] * 120] * 200}}).encode())
    assert status == 413 and "over the limit" in error
    status, error = _post(daemon, json.dumps({"inputs": {"input_ids": [[1]] * 65}}).encode())
    assert status == 413 and "batch of 65 is over the limit of 64" in error

    status, _, data = daemon.request("GET", "/v1/models/tiny/infer")
    assert status == 405
    status, _, data = daemon.request("GET", "/v2/nothing")
    assert status == 404 and b"no endpoint" in data

    # None of that disturbed serving.
    inputs = handmade.inputs(1, 3)
    status, got, _ = daemon.infer("tiny", inputs)
    assert status == 200
    assert_same(got, reference.run(inputs), reference.outputs)


def test_oversized_body_rejected_before_it_is_sent(daemon):
    """A client announcing a huge body gets 413 without the daemon reading (or buffering) it."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply


def test_concurrent_clients_while_variants_compile(daemon, reference):
    """16 clients x 200 requests of mixed lengths: no errors, every result right, and the JIT
    compiles and swaps in variants while they run."""
    before = daemon.metrics()
    lengths = [random.Random(7).choice([2, 3, 5, 7, 11, 13, 20, 29, 40, 60]) for _ in range(50)]
    cases = {n: handmade.inputs(1, n, seed=n) for n in set(lengths)}
    want = {n: reference.run(x) for n, x in cases.items()}
    failures = []

    def client(k: int) -> int:
        rng = random.Random(k)
        conn = daemon.conn()
        done = 0
        for _ in range(200):
            n = rng.choice(lengths)
            status, got, _ = daemon.infer("tiny", cases[n], conn=conn)
            if status != 200:
                failures.append((n, status, got))
                continue
            try:
                assert_same(got, want[n], reference.outputs)
            except AssertionError as e:
                failures.append((n, "mismatch", str(e)[:200]))
            done += 1
        conn.close()
        return done

    with ThreadPoolExecutor(16) as pool:
        done = sum(pool.map(client, range(16)))
    assert not failures, failures[:5]
    assert done == 3200
    after = daemon.metrics()
    served = {kind: sum_samples(after, "edgejit_inference_seconds_count", model="tiny", kind=kind)
              - sum_samples(before, "edgejit_inference_seconds_count", model="tiny", kind=kind)
              for kind in ("generic", "variant", "padded")}
    assert sum(served.values()) == 3200
    assert served["variant"] + served["padded"] > 0, served  # variants swapped in mid-run
    assert sum_samples(after, "edgejit_jit_events_total", model="tiny", event="swapped_in") >= 1
    assert sum_samples(after, "edgejit_http_requests_total", model="tiny", endpoint="infer", code="200") >= 3200
    _, doc = daemon.get("/v1/models/tiny")
    assert doc["jit"]["ready_lengths"], doc["jit"]


def test_metrics_are_prometheus_text(daemon):
    status, headers, data = daemon.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = data.decode()
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name] = kind
        elif line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert name in families or base in families, line
            float(line.rsplit(" ", 1)[1])
    assert families["edgejit_inference_seconds"] == "histogram"
    assert families["edgejit_http_requests_total"] == "counter"
    buckets = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edgejit_inference_seconds_bucket{")  # label order is the exporter's
               and 'model="tiny"' in line and 'kind="generic"' in line]
    assert buckets == sorted(buckets) and buckets[-1] > 0


def test_saturated_daemon_answers_503(tmp_path, tiny_artifact):
    """Admission control in process: with 1 worker and no queue, a second request is turned away."""
    from edge.serve.config import parse_config
    from edge.serve.server import Saturated
    from edge.serve.service import Daemon

    cfg = parse_config({"models": [{"name": "tiny", "artifact": str(tiny_artifact)}], "server": {"workers": 1, "queue": 0}, "runtime": {"allow_unsigned": True}}, base=tmp_path)
    d = Daemon(cfg)
    gate = threading.Event()
    d._run = lambda ticket, *a: (gate.wait(10), ticket.release())
    first, ticket = d.submit("tiny", b"", None, None)
    with pytest.raises(Saturated, match="saturated"):
        d.submit("tiny", b"", None, None)
    gate.set()
    first.result(5)
    with pytest.raises(Saturated):  # the response is not written yet: still counted
        d.submit("tiny", b"", None, None)
    ticket.release()
    again, ticket = d.submit("tiny", b"", None, None)  # room again
    again.result(5)
    ticket.release()
    assert d._pending == 0 and d.metrics.rejected["saturated"] == 2
    d.progress.close()


def test_reload_swaps_atomically_and_rolls_back(tmp_path, tiny_artifact):
    """A new version swaps in while requests run; a corrupt one is rejected and the old one keeps
    serving; SIGHUP picks up a flipped symlink."""
    from deploy.compiler.driver import compile_model

    arts = tmp_path / "artifacts"
    v1 = shutil.copytree(tiny_artifact, arts / "v1")
    v2 = compile_model(handmade.encoder(tmp_path / "v2.onnx", seed=1), "host", arts / "v2", max_seq=128, log=lambda *a: None)
    bad = shutil.copytree(v2, arts / "v3-corrupt")
    params = bad / "params.npz"
    params.write_bytes(params.read_bytes()[:-10] + b"0123456789")
    (arts / "current").symlink_to("v1")
    inputs = handmade.inputs(2, 6)
    with edge.Runtime(v1) as r1, edge.Runtime(v2) as r2:
        want1, want2, specs = r1.run(inputs), r2.run(inputs), r1.outputs
    assert not np.allclose(want1[0], want2[0])

    d = start(tmp_path, {"tiny": arts / "current"}, jit=None)
    try:
        errors, stop = [], threading.Event()

        def traffic():
            conn = d.conn()
            while not stop.is_set():
                status, got, _ = d.infer("tiny", inputs, conn=conn)
                if status != 200:
                    errors.append((status, got))
                elif not (np.allclose(got["hidden"], want1[0], atol=1e-5) or np.allclose(got["hidden"], want2[0], atol=1e-5)):
                    errors.append("result of neither version")
            conn.close()

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        status, _, data = d.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(v2)}).encode())
        doc = json.loads(data)
        assert status == 200 and doc["result"] == "swapped", doc
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert_same(d.infer("tiny", inputs)[1], want2, specs)

        status, _, data = d.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(bad)}).encode())
        doc = json.loads(data)
        assert status == 422 and doc["result"] == "rolled_back" and "checksum" in doc["error"], doc
        assert doc["current"]["artifact"] == str(v2)
        assert_same(d.infer("tiny", inputs)[1], want2, specs)

        status, _, data = d.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": "/etc"}).encode())
        assert status == 403

        # The operator's way: flip the symlink, SIGHUP.
        (arts / "current").unlink()
        (arts / "current").symlink_to("v1")
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, doc = d.get("/v1/models/tiny")
            if doc["artifact"] == str(arts / "current"):
                break
            time.sleep(0.2)
        assert doc["artifact"] == str(arts / "current"), doc
        assert_same(d.infer("tiny", inputs)[1], want1, specs)
        m = d.metrics()
        assert sum_samples(m, "edgejit_reloads_total", result="swapped") == 2
        assert sum_samples(m, "edgejit_reloads_total", result="rolled_back") == 1
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert "new version rejected, still serving version" in log and "Traceback" not in log


def test_sigterm_during_load_finishes_in_flight_requests(tmp_path, tiny_artifact, reference):
    d = start(tmp_path, {"tiny": tiny_artifact}, server={"workers": 2, "queue": 64, "drain_timeout_s": 60.0})
    big = handmade.inputs(64, 128, seed=3)
    want = reference.run(big)
    results, signal_at = [], []

    def client():
        conn = d.conn(timeout=120)
        for _ in range(1000):  # back to back until the daemon turns us away after the signal
            sent = time.monotonic()
            try:
                status, got, _ = d.infer("tiny", big, conn=conn)  # JSON: ~0.1 s each to encode
            except (ConnectionError, OSError) as e:
                results.append(("refused", sent, time.monotonic(), type(e).__name__))
                conn.close()
                if signal_at:
                    return
                conn = d.conn(timeout=120)
                continue
            if status == 200:
                ok = all(np.allclose(got[s.name], w, atol=1e-5) for s, w in zip(reference.outputs, want))
                results.append(("ok" if ok else "mismatch", sent, time.monotonic(), status))
            else:
                results.append(("rejected", sent, time.monotonic(), status))
                return
        conn.close()
        raise AssertionError("the daemon never stopped serving")

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    signal_at.append(time.monotonic())
    d.signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    rc = d.proc.wait(60)
    log = d.log()
    d.stop()
    assert rc == 0, log
    assert "stopped cleanly" in log
    assert not [r for r in results if r[0] == "mismatch"]
    # Turned away after the signal: a clean 503 (or, once the process is gone, a refused
    # connection). Requests on the wire when the signal landed were answered: the admitted ones
    # with the right result, those that arrived after the drain began with 503; none dropped.
    assert all(r[3] == 503 for r in results if r[0] == "rejected")
    straddling = [r for r in results if r[1] < signal_at[0] < r[2]]
    assert all(r[0] in ("ok", "rejected") for r in straddling), straddling
    assert any(r[0] == "ok" for r in straddling), straddling
    profiles = list((tmp_path / "state" / "profiles").glob("*.json"))  # the JIT's shape profile, saved
    assert len(profiles) == 1 and json.loads(profiles[0].read_text())["lengths"].get("128", 0) >= 6
