"""POST /v1/embeddings end to end: a real `edgejit daemon` serving the bundled all-MiniLM-L6-v2 (real
weights, compiled with its tokenizer.json), driven by the official `openai` client. The vectors are
checked against sentence-transformers' recipe (BertModel in transformers/torch on the same weights,
mean pooling over the attention mask, L2 normalization) computed in this process."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, sum_samples, write_config

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it and would watch it again tomorrow.",
    "Two dogs play in the snow.",
    "Sentence embeddings map text to vectors; similar meanings land close together.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(weights dir, artifact) of the bundled example, compiled for this machine with its tokenizer."""
    from deploy.compiler.driver import compile_model
    from deploy.tools import examples

    root = tmp_path_factory.mktemp("minilm")
    onnx_path = examples.write_minilm(root / "example", log=lambda *a: None)
    if not (root / "example" / "tokenizer.json").is_file():
        pytest.skip("all-MiniLM-L6-v2 weights unavailable (no network and no cache)")
    art = compile_model(onnx_path, "host", root / "minilm", max_seq=128, log=lambda *a: None)
    return examples.fetch_minilm(), art


@pytest.fixture(scope="module")
def daemon(minilm, tiny_artifact, tiny_llamas, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb_daemon")
    port = free_port()
    cfg = write_config(tmp / "daemon.toml", {"minilm": minilm[1], "tiny": tiny_artifact, "llama": tiny_llamas["gqa_tied"][1]},
                       server={"port": port, "max_batch": 4, "workers": 1},
                       generation={"max_seqs": 1, "max_queue": 1})
    d = DaemonProcess(cfg, port, tmp / "daemon.log").start(wait_ready=300)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="none", max_retries=0, timeout=120)


def reference(weights_dir, texts):
    """sentence-transformers' all-MiniLM-L6-v2 embedding: BertModel -> mean over the mask -> L2 norm."""
    from tokenizers import Tokenizer

    from deploy.tools.examples import minilm_model

    tok = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        hidden = minilm_model(weights_dir)(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy(), int(mask.sum())


def test_openai_client_matches_sentence_transformers_recipe(client, minilm):
    ref, n_tokens = reference(minilm[0], TEXTS)
    resp = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    assert got.shape == (len(TEXTS), 384)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert resp.usage.prompt_tokens == n_tokens == resp.usage.total_tokens
    assert resp.model == "minilm"
    # meaning: the two sentences about a man eating are the closest pair
    sims = got @ got.T
    np.fill_diagonal(sims, -1)
    assert set(np.unravel_index(sims.argmax(), sims.shape)) == {0, 1}

    one = client.embeddings.create(model="minilm", input=TEXTS[2], encoding_format="float")
    assert np.abs(np.array(one.data[0].embedding, dtype=np.float32) - ref[2]).max() < 1e-4


def test_float_base64_and_token_ids_agree(daemon, minilm):
    from tokenizers import Tokenizer

    def post(doc):
        status, _, data = daemon.request("POST", "/v1/embeddings", json.dumps(doc).encode(), {"Content-Type": "application/json"})
        return status, json.loads(data)

    status, f = post({"model": "minilm", "input": TEXTS[:3], "encoding_format": "float"})
    assert status == 200 and f["object"] == "list" and f["data"][0]["object"] == "embedding"
    status, b = post({"model": "minilm", "input": TEXTS[:3], "encoding_format": "base64"})
    assert status == 200
    floats = np.array([d["embedding"] for d in f["data"]], np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b["data"]])
    assert np.array_equal(floats, decoded)
    tok = Tokenizer.from_file(str(minilm[0] / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    ids = [e.ids for e in tok.encode_batch(TEXTS[:3])]
    status, t = post({"model": "minilm", "input": ids, "encoding_format": "float"})
    assert status == 200 and t["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert np.abs(np.array([d["embedding"] for d in t["data"]], np.float32) - floats).max() < 1e-6
    status, single = post({"model": "minilm", "input": ids[1]})  # one input as a flat id list
    assert status == 200 and len(single["data"]) == 1
    assert np.abs(np.array(single["data"][0]["embedding"], np.float32) - floats[1]).max() < 1e-5


def test_errors_in_openai_shape(client, daemon):
    cases = [
        (dict(model="llama", input="hello"), 400, "text-generation model"),
        (dict(model="nope", input="hello"), 404, "no model named"),
        (dict(model="tiny", input="hello"), 400, "ships no tokenizer.json"),
        (dict(model="minilm", input=""), 400, "empty string"),
        (dict(model="minilm", input=[]), 400, "'input'"),
        (dict(model="minilm", input="word " * 300), 400, "maximum context length is 128"),
        (dict(model="minilm", input=[[101, 10**6, 102]]), 400, "outside the vocabulary"),
        (dict(model="minilm", input="hi", encoding_format="int8"), 400, "encoding_format"),
        (dict(model="minilm", input="hi", dimensions=128), 400, "'dimensions' must be 384"),
    ]
    for kwargs, status, text in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.embeddings.create(**kwargs)
        assert e.value.status_code == status, (kwargs, e.value.body)
        assert set(e.value.body) == {"message", "type", "param", "code"}, e.value.body
        assert text in e.value.body["message"], (kwargs, e.value.body)
    status, _, data = daemon.request("POST", "/v1/embeddings", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    status, headers, _ = daemon.request("GET", "/v1/embeddings")
    assert status == 405 and headers["Allow"] == "POST"
    # the tiny encoder without a tokenizer still embeds token ids; every error left the daemon serving
    status, _, data = daemon.request("POST", "/v1/embeddings", json.dumps({"model": "tiny", "input": [[1, 5, 7]]}).encode())
    assert status == 200, data
    m = daemon.metrics()
    assert sum_samples(m, "edgejit_http_requests_total", endpoint="/v1/embeddings", code="200") >= 1
    assert sum_samples(m, "edgejit_http_requests_total", endpoint="/v1/embeddings", code="400") >= 7


def test_batches_longer_than_max_batch(client, minilm):
    """12 inputs with [server] max_batch 4: three encoder calls, vectors back in request order."""
    texts = [TEXTS[i % len(TEXTS)] + " " + "more " * i for i in range(12)]
    ref, _ = reference(minilm[0], texts)
    got = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data], np.float32)
    assert np.abs(got - ref).max() < 1e-4
