"""The daemon's OpenAI-compatible API end to end: a real `edgejit daemon` process serving the bundled
SmolLM2 and a tiny random Llama, driven by the official `openai` client (and raw HTTP for the SSE
framing and malformed bodies). Replies are checked against edge.generate.Generator (greedy) in this
process, itself checked against transformers in tests/edge/generate/test_smollm2.py."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest

from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the tallest mountain in the world?"}]
N = 24


@pytest.fixture(scope="module")
def models_dir(tiny_llamas, tmp_path_factory):
    """The tiny llama copied into a directory of its own (reload tests put new versions beside it)."""
    root = tmp_path_factory.mktemp("openai_models")
    shutil.copytree(tiny_llamas["gqa_tied"][1], root / "tiny")
    return root


@pytest.fixture(scope="module")
def daemon(smollm2_artifact, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai_daemon")
    port = free_port()
    cfg = write_config(tmp / "daemon.toml", {"smol": smollm2_artifact, "tiny": models_dir / "tiny"},
                       server={"port": port, "max_body_mb": 0.5},
                       generation={"max_seqs": 4, "max_queue": 2, "request_timeout_s": 120.0})
    d = DaemonProcess(cfg, port, tmp / "daemon.log").start(wait_ready=300)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smol(smollm2_artifact):
    from edge.generate import Generator

    return Generator(smollm2_artifact)


@pytest.fixture(scope="module")
def tiny(models_dir):
    from edge.generate import Generator

    return Generator(models_dir / "tiny")


def solo_chat(gen, messages, n=N, **kw):
    text = "".join(gen.chat(messages, max_tokens=n, **kw))
    return text, gen.stats


def gen_metrics(daemon, model):
    m = daemon.metrics()
    return {k: sum_samples(m, f"edgejit_generation_{k}", model=model)
            for k in ("sequences_running", "sequences_queued", "kv_tokens_in_use")}


def wait_idle(daemon, model, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g = gen_metrics(daemon, model)
        if g == {"sequences_running": 0, "sequences_queued": 0, "kv_tokens_in_use": 0}:
            return g
        time.sleep(0.1)
    raise AssertionError(f"model '{model}' not idle after {timeout}s: {gen_metrics(daemon, model)}")


# -- models ---------------------------------------------------------------------------------------
def test_models_in_openai_shape_and_the_old_one(client, daemon):
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {"smol", "tiny"} and ids["smol"].owned_by == "edgejit" and ids["smol"].object == "model"
    assert isinstance(ids["smol"].created, int) and ids["smol"].created > 1.7e9
    assert client.models.retrieve("smol").id == "smol"
    status, doc = daemon.get("/v1/models")
    assert status == 200 and doc["object"] == "list"
    smol = next(m for m in doc["models"] if m["name"] == "smol")  # the keys existing clients read
    assert smol["state"] == "ready" and smol["kind"] == "decoder" and smol["version"] and smol["context"] == 1024
    assert smol["generation"]["max_seqs"] == 4 and smol["generation"]["max_queue"] == 2


# -- chat -----------------------------------------------------------------------------------------
def test_chat_equals_generator(client, smol):
    want, st = solo_chat(smol, CHAT)
    r = client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_tokens=N)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want and want
    assert choice.finish_reason == st.finish_reason
    assert r.object == "chat.completion" and r.model == "smol" and r.id.startswith("chatcmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (st.prompt_tokens, st.completion_tokens)
    assert r.usage.total_tokens == st.prompt_tokens + st.completion_tokens
    assert r.usage.prompt_tokens == len(smol.chat_prompt(CHAT))


def test_streaming_chat_chunks(client, smol):
    want, st = solo_chat(smol, CHAT)
    chunks = list(client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_tokens=N,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, last_choice, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.role is None for c in middle)
    assert len(middle) > 1  # streamed piece by piece
    assert "".join(c.choices[0].delta.content for c in middle) == want
    assert last_choice.choices[0].finish_reason == st.finish_reason and not last_choice.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == st.completion_tokens
    assert usage.usage.prompt_tokens == st.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_gives_length_and_stop_strings_cut(client, smol):
    r = client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    want, _ = solo_chat(smol, CHAT)
    stop = want.split()[2]  # a word from the middle of the greedy reply
    r = client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_tokens=N, stop=[stop, "zzqx"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == want[: want.index(stop)]
    stream = client.chat.completions.create(model="smol", messages=CHAT, temperature=0, max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[: want.index(stop)]


# -- completions ----------------------------------------------------------------------------------
def test_completions(client, smol):
    prompt = "The capital of France is"
    want = "".join(smol.complete(prompt, max_tokens=12))
    st = smol.stats
    r = client.completions.create(model="smol", prompt=prompt, temperature=0, max_tokens=12)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.choices[0].finish_reason == st.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (st.prompt_tokens, st.completion_tokens)
    chunks = list(client.completions.create(model="smol", prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == st.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_tiny_llama_sampling_options(client, tiny):
    """Breadth on the tiny model: greedy equals the Generator; our extensions; a seed repeats."""
    ids = tiny.tokenizer.encode("Once upon a time")
    want = "".join(tiny.generate(ids, max_tokens=20, ignore_eos=True, repetition_penalty=1.3))
    r = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=20,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    r = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=20,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert r.choices[0].text == want  # token ids as the prompt
    kw = dict(model="tiny", prompt="Once upon a time", temperature=0.9, top_p=0.9, max_tokens=16, seed=7,
              extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    want = "".join(tiny.generate(ids, max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=7, ignore_eos=True))
    assert a.choices[0].text == want
    if tiny.template.source:  # chat on the tiny model too when its GGUF carries a template
        want, st = solo_chat(tiny, CHAT, 8, ignore_eos=True)
        r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want


# -- errors ---------------------------------------------------------------------------------------
def _openai_error(exc) -> dict:
    doc = exc.response.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    return doc["error"]


def test_errors_through_the_client(client, tiny):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    err = _openai_error(e.value)
    assert e.value.status_code == 404 and "no model named 'nope'" in err["message"] and err["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=CHAT, n=2)
    assert _openai_error(e.value)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello " * 400)  # the tiny model's context is 256
    err = _openai_error(e.value)
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error" and "256" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user"}])
    assert _openai_error(e.value)["param"] == "messages[0].content"
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"stop": [1]}, {"logprobs": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smol", messages=CHAT, **bad)
        assert _openai_error(e.value)["param"] == next(iter(bad)), bad
    with pytest.raises(openai.BadRequestError) as e:  # a tensor model's endpoint is not for decoders
        client.post("/models/tiny/infer", body={"inputs": {"input_ids": [[1]]}}, cast_to=object)
    assert e.value.status_code == 400 and "text-generation model" in e.value.response.json()["error"]


def _raw(daemon, path, body: bytes, headers=None):
    status, hdrs, data = daemon.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, data


def test_raw_errors_keep_the_shapes(daemon):
    status, _, data = _raw(daemon, "/v1/chat/completions", b'{"model": "smol", "messages": [')
    err = json.loads(data)["error"]
    assert status == 400 and "malformed JSON" in err["message"] and err["type"] == "invalid_request_error"
    status, _, data = _raw(daemon, "/v1/chat/completions", b"x" * (1 << 20))  # over max_body_mb = 0.5
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    status, _, data = _raw(daemon, "/v1/models/nope/infer", b"{}")  # the old endpoints' shape is unchanged
    assert status == 404 and set(json.loads(data)) == {"error", "status"}
    status, _, data = daemon.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(data)


def test_sse_framing_raw_http(daemon):
    conn = daemon.conn()
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "Hello", "stream": True, "max_tokens": 4,
                                                        "temperature": 0, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.getheader("Transfer-Encoding") == "chunked"
    raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    docs = [json.loads(e[6:]) for e in events[:-1]]
    assert all(d["object"] == "text_completion" for d in docs) and docs[-1]["choices"][0]["finish_reason"] == "length"
    # the connection stays usable (keep-alive) for the next request
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


# -- many users -----------------------------------------------------------------------------------
QUESTIONS = ["What is the tallest mountain in the world?", "Name three primary colors.",
             "How many legs does a spider have?", "Write a haiku about the sea."]


def test_concurrent_streams_get_their_solo_replies(client, smol, daemon):
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    want = [solo_chat(smol, c, 20)[0] for c in convs]
    got = [None] * len(convs)
    barrier = threading.Barrier(len(convs))

    def user(i):
        barrier.wait()
        stream = client.chat.completions.create(model="smol", messages=convs[i], temperature=0, max_tokens=20, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    wait_idle(daemon, "smol")


def _open_stream(daemon, model, max_tokens, content="Tell me a long story."):
    """A raw streaming request whose first content event has arrived; returns the socket."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=120)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    while data.count(b"data: ") < 3:  # the role chunk and two pieces of text
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return sock


def test_client_that_disconnects_frees_its_kv(daemon):
    before = sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="smol", finish_reason="cancelled")
    sock = _open_stream(daemon, "smol", 900)
    assert gen_metrics(daemon, "smol")["kv_tokens_in_use"] > 0
    sock.close()
    t0 = time.monotonic()
    wait_idle(daemon, "smol", timeout=20)
    assert time.monotonic() - t0 < 10  # cancelled at once, not after 900 tokens
    after = sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="smol", finish_reason="cancelled")
    assert after == before + 1


def test_client_that_disconnects_before_a_non_streamed_reply_frees_its_kv(daemon):
    before = sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="smol", finish_reason="cancelled")
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=120)
    body = json.dumps({"model": "smol", "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while gen_metrics(daemon, "smol")["kv_tokens_in_use"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gen_metrics(daemon, "smol")["sequences_running"] == 1
    sock.close()
    t0 = time.monotonic()
    wait_idle(daemon, "smol", timeout=20)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while sum_samples(daemon.metrics(), "edgejit_generation_requests_total", model="smol", finish_reason="cancelled") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_queue_full_is_429_with_retry_after(client, daemon):
    """max_seqs 4 running + max_queue 2 waiting: the next request gets 429; all freed afterwards."""
    socks = [_open_stream(daemon, "smol", 900, f"Story number {i}.") for i in range(4)]
    waiting = []
    try:
        def queued():
            waiting.append(client.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0))

        threads = [threading.Thread(target=queued) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while gen_metrics(daemon, "smol")["sequences_queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gen_metrics(daemon, "smol")["sequences_queued"] == 2
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="smol", messages=CHAT, max_tokens=2)
        assert e.value.response.headers["Retry-After"] == "1"
        assert _openai_error(e.value)["type"] == "rate_limit_error"
    finally:
        for s in socks:
            s.close()
    for t in threads:
        t.join(120)
    assert len(waiting) == 2 and all(w.usage.completion_tokens >= 1 for w in waiting)
    wait_idle(daemon, "smol")


# -- metrics and versions -------------------------------------------------------------------------
def test_generation_metrics(daemon):
    m = daemon.metrics()
    assert sum_samples(m, "edgejit_generation_prompt_tokens_total", model="smol") > 0
    assert sum_samples(m, "edgejit_generation_completion_tokens_total", model="smol") > 0
    assert sum_samples(m, "edgejit_generation_requests_total", model="smol", finish_reason="length") > 0
    assert sum_samples(m, "edgejit_generation_requests_total", model="smol", finish_reason="stop") > 0
    assert sum_samples(m, "edgejit_generation_ttft_seconds_count", model="smol") > 0
    assert sum_samples(m, "edgejit_generation_kv_bytes", model="smol") > 0
    assert sum_samples(m, "edgejit_http_requests_total", model="smol", endpoint="/v1/chat/completions", code=200) > 0


def test_reload_and_rollback_of_a_decoder(client, daemon, models_dir):
    ask = dict(model="tiny", prompt="Hello", temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    want = client.completions.create(**ask).choices[0].text
    status, _, data = daemon.request("POST", "/v1/models/tiny/reload")
    assert status == 200 and json.loads(data)["result"] == "unchanged"
    shutil.copytree(models_dir / "tiny", models_dir / "tiny_v2")
    status, _, data = daemon.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(models_dir / "tiny_v2")}).encode())
    doc = json.loads(data)
    assert status == 200 and doc["result"] == "swapped" and doc["current"]["artifact"].endswith("tiny_v2"), doc
    assert client.completions.create(**ask).choices[0].text == want
    shutil.copytree(models_dir / "tiny", models_dir / "tiny_bad")
    (models_dir / "tiny_bad" / "generic.so").write_bytes(b"not a library")
    status, _, data = daemon.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(models_dir / "tiny_bad")}).encode())
    doc = json.loads(data)
    assert status == 422 and doc["result"] == "rolled_back" and doc["current"]["artifact"].endswith("tiny_v2"), doc
    assert client.completions.create(**ask).choices[0].text == want


def test_signed_decoders_only_when_keys_are_trusted(tiny_llamas, tmp_path):
    """The trust rules of every artifact: with trusted_keys (and no allow_unsigned) a signed
    decoder serves, an unsigned one is refused (a reload to it rolls back)."""
    from deploy.compiler.signing import generate_keypair, load_private_key, sign_artifact

    private, public, _ = generate_keypair(tmp_path / "keys" / "build.key")
    models = tmp_path / "models"
    shutil.copytree(tiny_llamas["gqa_tied"][1], models / "signed")
    sign_artifact(models / "signed", load_private_key(private))
    shutil.copytree(tiny_llamas["gqa_tied"][1], models / "unsigned")
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": models / "signed"}, server={"port": port},
                       runtime={"trusted_keys": [str(public)]})
    with DaemonProcess(cfg, port, tmp_path / "daemon.log") as d:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        status, _, data = d.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(models / "unsigned")}).encode())
        doc = json.loads(data)
        assert status == 422 and doc["result"] == "rolled_back" and "sign" in doc["error"].lower(), doc
        assert c.completions.create(model="tiny", prompt="Hello", max_tokens=3).usage.prompt_tokens > 0
