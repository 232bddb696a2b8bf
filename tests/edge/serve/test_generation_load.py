"""Load test of the chat server (issue 18): 8 concurrent clients with mixed prompt lengths (real
text: Debian fortunes), streamed through the official `openai` client from a real `edgejit daemon`
process serving SmolLM2 (4 sequence slots, so half of them queue; half share a system prompt, so the
prefix cache forks while others decode). Every streamed reply equals the reply the same request gets
alone (greedy, in this process, without the prefix cache): no cross-talk between sequences. Clients
that disconnect mid-stream free their KV: the KV memory in /metrics returns to its level before."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

CLIENTS = 8
SLOTS = 4


def _requests() -> list[dict]:
    """8 chat requests of mixed lengths (about 30 to 330 prompt tokens), 4 with a shared system prompt."""
    from deploy.tools.corpus import sentences

    texts = [t for t in sentences() if 40 <= len(t) <= 300]
    rng = np.random.default_rng(18)
    pick = lambda k: " ".join(texts[i] for i in rng.choice(len(texts), k, replace=False))  # noqa: E731
    system = "You answer in one short paragraph. " + pick(3)
    out = []
    for i, k in enumerate((1, 6, 2, 10, 1, 4, 3, 8)):
        messages = [{"role": "user", "content": pick(k)}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": system})
        out.append({"messages": messages, "max_tokens": 10 + 3 * i})
    return out


@pytest.fixture(scope="module")
def daemon(smollm2_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load_daemon")
    port = free_port()
    cfg = write_config(tmp / "daemon.toml", {"smol": smollm2_artifact}, server={"port": port},
                       generation={"max_seqs": SLOTS, "max_queue": 16, "request_timeout_s": 120.0})
    d = DaemonProcess(cfg, port, tmp / "daemon.log").start(wait_ready=300)
    yield d
    assert d.stop() == 0, d.log()


def _kv(daemon) -> dict:
    m = daemon.metrics()
    return {k: sum_samples(m, f"edgejit_generation_{k}", model="smol")
            for k in ("kv_tokens_in_use", "kv_bytes_in_use", "sequences_running", "sequences_queued")}


def _wait(daemon, want: dict, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = _kv(daemon)
        if all(got[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_concurrent_streams_equal_alone_and_disconnects_free_kv(daemon, smollm2_artifact):
    from edge.generate import Generator

    requests = _requests()
    with Generator(smollm2_artifact, prefix_cache_tokens=0) as gen:
        lengths = [len(gen.chat_prompt(r["messages"])) for r in requests]
        want = ["".join(gen.chat(r["messages"], max_tokens=r["max_tokens"])) for r in requests]
    assert min(lengths) < 60 and max(lengths) > 250, lengths

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="none", max_retries=0, timeout=300)
    got, usage, errors = [None] * CLIENTS, [None] * CLIENTS, []
    start = threading.Barrier(CLIENTS)

    def user(i):
        try:
            start.wait()
            pieces = []
            stream = client.chat.completions.create(model="smol", stream=True, temperature=0,
                                                    stream_options={"include_usage": True}, **requests[i])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage[i] = chunk.usage
            got[i] = "".join(pieces)
        except Exception as e:  # reported below, with the others
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert got == want
    assert [u.prompt_tokens for u in usage] == lengths
    # a request is counted once its stream has ended: a client can hold its last chunk a moment before
    deadline = time.monotonic() + 10
    while True:
        m = daemon.metrics()
        done = sum(sum_samples(m, "edgejit_generation_requests_total", model="smol", finish_reason=r) for r in ("stop", "length"))
        if done >= CLIENTS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done == CLIENTS
    status, doc = daemon.get("/v1/models")
    gen_stats = next(x for x in doc["models"] if x["name"] == "smol")["generation"]
    assert gen_stats["prefix_hits"] >= 1  # the shared system prompt, while others were decoding

    # disconnects mid-stream: KV back to where it was (retained prefix-cache entries untouched)
    idle = _wait(daemon, {"kv_tokens_in_use": 0, "sequences_running": 0, "sequences_queued": 0})
    assert idle["kv_tokens_in_use"] == 0 and idle["kv_bytes_in_use"] > 0, idle  # the prefix cache holds some
    # (new prompts: one that took over a retained sequence would take that sequence with it)
    socks = [_open_stream(daemon, [{"role": "user", "content": f"Tell me a long story about {w}."}])
             for w in ("a lighthouse", "two rivers", "the moon")]
    busy = _kv(daemon)
    assert busy["kv_tokens_in_use"] > 0 and busy["kv_bytes_in_use"] > idle["kv_bytes_in_use"], busy
    for s in socks:
        s.close()
    after = _wait(daemon, {"kv_tokens_in_use": 0, "sequences_running": 0, "kv_bytes_in_use": idle["kv_bytes_in_use"]})
    assert after == idle, (after, idle)
    cancelled = sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="smol", finish_reason="cancelled")
    assert cancelled == 3


def _open_stream(daemon, messages) -> socket.socket:
    """A raw streaming request (it would run for 900 tokens) whose first text has arrived."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=120)
    body = json.dumps({"model": "smol", "messages": messages, "stream": True, "max_tokens": 900,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while data.count(b"data: ") < 3:  # the role chunk and two pieces of text
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return sock
