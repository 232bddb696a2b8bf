"""Hostile clients of the streaming endpoints (issue 20): a client that opens an SSE stream and then
reads nothing blocks neither the engine nor other clients, and its request is cancelled (its KV
freed) once a write has made no progress for idle_timeout_s. (A client that disconnects mid-stream
is cancelled at once: test_openai_api.py::test_client_that_disconnects_frees_its_kv.)"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config

pytestmark = pytest.mark.slow  # the tiny llamas (shared with the generation tests)

IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def daemon(tiny_llamas, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streams")
    port = free_port()
    cfg = write_config(tmp / "daemon.toml", {"tiny": tiny_llamas["gqa_tied"][1]},
                       server={"port": port, "idle_timeout_s": IDLE_TIMEOUT},
                       generation={"max_seqs": 2, "request_timeout_s": 120.0}, log="debug")
    d = DaemonProcess(cfg, port, tmp / "daemon.log").start()
    yield d
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


def generation(daemon) -> dict:
    m = daemon.metrics()
    return {k: sum_samples(m, f"edgejit_generation_{k}", model="tiny") for k in ("sequences_running", "kv_tokens_in_use")}


def cancelled(daemon) -> float:
    return sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="tiny", finish_reason="cancelled")


def completion(daemon, prompt: str, n: int) -> str:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}).encode()
    status, _, data = daemon.request("POST", "/v1/completions", body)
    assert status == 200, data
    doc = json.loads(data)
    assert doc["usage"]["completion_tokens"] == n, doc
    return doc["choices"][0]["text"]


def test_a_stream_reader_that_reads_nothing_is_cut_off_and_blocks_no_one(daemon):
    want = completion(daemon, "Once upon a time", 40)
    before = cancelled(daemon)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # it reads nothing: its window closes at once
    sock.connect(("127.0.0.1", daemon.port))
    body = json.dumps({"model": "tiny", "prompt": "Tell me a long story.", "max_tokens": 240, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        # meanwhile others are served as usual, with the same results
        start = time.monotonic()
        for _ in range(3):
            assert completion(daemon, "Once upon a time", 40) == want
        assert time.monotonic() - start < IDLE_TIMEOUT * 3
        # the stalled stream is cancelled once a write has waited idle_timeout_s, and its KV freed
        deadline = time.monotonic() + IDLE_TIMEOUT + 15
        while cancelled(daemon) == before:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.2)
        assert time.monotonic() - start < IDLE_TIMEOUT + 10
        g = generation(daemon)
        assert g == {"sequences_running": 0, "kv_tokens_in_use": 0}, g
    finally:
        sock.close()
    assert completion(daemon, "Once upon a time", 40) == want
    log = daemon.log()
    assert "went away mid-stream: request cancelled" in log and "Traceback" not in log
