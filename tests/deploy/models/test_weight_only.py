"""`edgejit compile --precision q4|q8` for decoders read in float (deploy/quantize/weight_only):
tiny random-weight Hugging Face checkpoints (Llama tied, GPT-2 with its transposed Conv1D matrices),
an ONNX decoder with past (Qwen2, untied, q/k/v biases; through the real CLI) and a float GGUF of
the Llama weights, each compiled once per session. The codes are llama.cpp's reference quantizers'
(gguf-py's bit-exact port); the artifacts give transformers' greedy tokens and logits on the
dequantized weights (our quantization applied to the fp32 weights: the comparison isolates the
kernels); the manifest's accuracy report is recomputed from transformers' fp32 logits and the
artifact's; bad flags fail with one line. One slow check on the bundled SmolLM2 made into a
checkpoint directory by transformers."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import ROOT, compile_fails
from tests.fixtures.decoding import LOGIT_TOL, N_NEW, PROMPTS, greedy_decode
from tests.fixtures.gguf_gpt2 import write_gpt2_checkpoint
from tests.fixtures.hf_checkpoints import write_checkpoint, write_gguf
from tests.fixtures.hf_reference import greedy, teacher_forced_logits
from tests.fixtures.onnx_decoders import write_onnx_decoder


@pytest.fixture(scope="session")
def weight_only(smollm2_gguf, tmp_path_factory):
    """{name: {"fx", "art", "precision", "log"}}: llama_q8 / llama_q4 (one tied Llama checkpoint; q4
    compiled with --min-accuracy 0.99 --accept-accuracy, which it misses), llama_q8_rpi5 (cross-compiled:
    measured without running the module), gpt2_q4, qwen2_onnx_q8 (the CLI, with fp32 activations and
    KV cache: the exact math transformers does), llama_gguf_q8 (the Llama
    weights as an F32 GGUF)."""
    from deploy.compiler.decoder import compile_decoder

    root = tmp_path_factory.mktemp("weight_only")
    llama = write_checkpoint(root / "llama", "llama", smollm2_gguf, seed=1, tie_word_embeddings=True)
    gpt2 = {**write_gpt2_checkpoint(root / "gpt2", smollm2_gguf, seed=1), "arch": "gpt2"}
    qwen2 = write_onnx_decoder(root / "qwen2", "qwen2", smollm2_gguf, seed=2, tie_word_embeddings=False)
    out = {}
    for name, fx, precision, target, kw in (("llama_q8", llama, "q8", "host", {}),
                                            ("llama_q4", llama, "q4", "host", dict(min_accuracy=0.99, accept_accuracy=True)),
                                            ("llama_q8_rpi5", llama, "q8", "rpi5", {}),
                                            ("gpt2_q4", gpt2, "q4", "host", {})):
        log = []
        art = compile_decoder(fx["path"], target, root / f"{name}.art", precision=precision, log=log.append, **kw)
        out[name] = {"fx": fx, "art": art, "precision": precision, "log": log}
    art = root / "qwen2_onnx_q8.art"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "compile", qwen2["path"], "-o", str(art), "--target", "host",
                        "--precision", "q8", "--matmul-activations", "fp32", "--kv-cache", "fp32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out["qwen2_onnx_q8"] = {"fx": qwen2, "art": art, "precision": "q8", "log": r.stdout.splitlines()}
    gguf = write_gguf(root / "llama.gguf", "llama", llama["model"], smollm2_gguf)
    log = []
    out["llama_gguf_q8"] = {"fx": {**llama, "gguf": gguf}, "precision": "q8", "log": log,
                            "art": compile_decoder(gguf, "host", root / "llama_gguf_q8.art", precision="q8", log=log.append)}
    return out


def _manifest(art) -> dict:
    return json.loads((Path(art) / "manifest.json").read_text())


def _dequantized_reference(fx, precision: str):
    """transformers' model of the fixture with exactly our quantization applied to its fp32 weights."""
    import torch

    from deploy.models import registry
    from deploy.quantize.weight_only import schemes

    model = fx["model"]
    arch = registry.get(fx["arch"])
    cfg = arch.config_from_hf(json.loads((Path(fx.get("hf_path", fx["path"])) / "config.json").read_text()))
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as the embedding: loaded through it
    linears = arch.linear_weights(cfg)
    schemes.quantize_linears(sd, linears, schemes.get(precision))
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in schemes.dequantized(sd, linears).items()},
                        strict=False)
    return ref.eval()


@pytest.fixture(scope="module")
def references(weight_only):
    return {name: _dequantized_reference(weight_only[name]["fx"], weight_only[name]["precision"]) for name in GENERATING}


# -- the quantizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bits", [("Q8_0", 8), ("Q4_1", 4)])
def test_codes_are_llama_cpp_reference_codes(kind, bits):
    """layout.quantize gives the codes of llama.cpp's reference quantizers (gguf-py's bit-exact port
    of ggml-quants.c); the scale and zero are the same values before GGUF rounds them to fp16."""
    import gguf
    from gguf import quants

    from deploy.quantize.weight_only.layout import from_gguf, quantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero group
    w[5, 32:64] = 0.7  # a constant group
    w[7, 64:96] = np.linspace(-1, 1, 32)  # values on the rounding boundaries
    ours = quantize(w, bits, "test")
    ref = from_gguf(kind, quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind)), w.shape)
    assert np.array_equal(ours.q, ref.q)
    live = ref.scale != 0  # llama.cpp stores d = 0 for a constant group, ours any scale (codes are 0)
    np.testing.assert_allclose(ours.scale[live], ref.scale[live], rtol=1e-3)
    np.testing.assert_allclose(ours.zero, ref.zero, rtol=1e-3, atol=1e-4)
    assert np.abs(ours.dequantize() - w).max() <= np.abs(ref.dequantize() - w).max() + 1e-6


# -- the artifacts --------------------------------------------------------------------------------
GENERATING = ["llama_q8", "llama_q4", "gpt2_q4", "qwen2_onnx_q8"]


@pytest.mark.parametrize("name", GENERATING)
@pytest.mark.parametrize("prompt", ["plain", "chat"])
def test_generates_transformers_tokens_on_dequantized_weights(weight_only, references, name, prompt):
    from edge.generate.loader import load_decoder

    model = load_decoder(weight_only[name]["art"], context=128)
    toks, logits = greedy_decode(model.decoder, PROMPTS[prompt], N_NEW)
    want_toks, want_logits = greedy(references[name], PROMPTS[prompt], N_NEW)
    assert toks == want_toks
    assert np.abs(logits - want_logits).max() / np.abs(want_logits).max() < LOGIT_TOL


def test_manifest_describes_the_quantization(weight_only):
    q8, q4, gpt2 = (_manifest(weight_only[n]["art"]) for n in ("llama_q8", "llama_q4", "gpt2_q4"))
    # 2 layers x (qkv, o, gate_up, down) + the LM head, which q4 keeps at 8 bits
    assert q8["precision"] == "wq8" and q8["quantization"]["layers"] == {"q8": 9}
    assert q4["precision"] == "wq4/q8" and q4["quantization"]["layers"] == {"q4": 8, "q8": 1}
    assert gpt2["quantization"]["layers"] == {"q4": 8, "q8": 1}
    assert q8["quantization"]["activations"] == "fp32"  # the Python API's default
    assert _manifest(weight_only["qwen2_onnx_q8"]["art"])["quantization"]["activations"] == "fp32"
    for m, p in ((q8, "q8"), (q4, "q4")):
        assert m["quantization"]["precision"] == p and m["quantization"]["group"] == 32
        assert m["quantization"]["float_layers"] == []
    names = set(q4["decoder"]["param_names"])
    assert "lm_head.qweight" in names and "layers.0.mlp.down_proj.qweight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize("name", ["llama_q8", "llama_q4", "llama_q8_rpi5", "gpt2_q4", "qwen2_onnx_q8", "llama_gguf_q8"])
def test_accuracy_report_in_manifest_and_log(weight_only, name):
    acc = _manifest(weight_only[name]["art"])["accuracy"]
    assert acc["kind"] == "decoder" and acc["metric"] == "top1_agreement" and acc["tokens"] == 256
    assert acc["precision"] == weight_only[name]["precision"]
    assert acc["measured_on"].startswith("numpy forward pass of the dequantized weights" if name.endswith("rpi5")
                                         else "the compiled module")
    ppl = acc["perplexity"]
    assert ppl["ratio"] == pytest.approx(ppl["quantized"] / ppl["fp32"])
    line = next(x for x in weight_only[name]["log"] if "accuracy on 256 tokens of real text" in x)
    assert f"top-1 agreement with fp32 {acc['value']:.4f}" in line
    if acc["precision"] == "q8":
        # tiny random models have near-tied logits (median top-1/top-2 gap 0.14): measured 0.90-0.94
        assert acc["value"] > 0.85 and abs(ppl["ratio"] - 1) < 0.01, acc


def test_q4_below_min_accuracy_is_written_when_accepted(weight_only):
    acc = _manifest(weight_only["llama_q4"]["art"])["accuracy"]
    assert acc["threshold"] == 0.99 and acc["below_threshold"] is True and acc["value"] < 0.99
    assert acc["value"] < _manifest(weight_only["llama_q8"]["art"])["accuracy"]["value"]


@pytest.mark.parametrize("name", ["llama_q8", "gpt2_q4"])
def test_accuracy_numbers_match_transformers(weight_only, name):
    """The report's top-1 agreement and perplexities, recomputed from transformers' fp32 logits and
    the artifact's own teacher-forced logits on the same corpus."""
    from deploy.quantize.weight_only import accuracy
    from edge.generate.loader import load_decoder

    w = weight_only[name]
    acc = _manifest(w["art"])["accuracy"]
    model = load_decoder(w["art"], context=256)
    info = _manifest(w["art"])["decoder"]["tokenizer"]
    from tokenizers import Tokenizer

    ids = accuracy.corpus_ids(Tokenizer.from_file(str(Path(w["art"]) / "tokenizer.json")), info["bos_id"], info["add_bos"], 256)
    fp32 = teacher_forced_logits(w["fx"]["model"], ids)
    model.decoder.add_sequence(0)
    ours = model.decoder.score(0, ids)
    assert abs(float((fp32.argmax(-1) == ours.argmax(-1)).mean()) - acc["value"]) <= 2 / 256
    assert accuracy.perplexity(fp32, ids) == pytest.approx(acc["perplexity"]["fp32"], rel=1e-4)
    assert accuracy.perplexity(ours, ids) == pytest.approx(acc["perplexity"]["quantized"], rel=1e-4)


def test_cross_compile_measure_agrees_with_the_module(weight_only):
    """A module that does not run here (rpi5 on x86) is measured as its dequantized weights in numpy:
    the numbers of the host module, and the same weights."""
    from edge.artifact.reader import Artifact

    host, cross = (_manifest(weight_only[n]["art"])["accuracy"] for n in ("llama_q8", "llama_q8_rpi5"))
    assert abs(cross["value"] - host["value"]) <= 2 / 256
    assert cross["perplexity"]["quantized"] == pytest.approx(host["perplexity"]["quantized"], rel=1e-4)
    assert cross["perplexity"]["fp32"] == host["perplexity"]["fp32"]
    a, b = (Artifact.open(weight_only[n]["art"], check_host=False) for n in ("llama_q8", "llama_q8_rpi5"))
    for x, y in zip(a.load_params(), b.load_params()):
        np.testing.assert_array_equal(x, y)


def test_float_gguf_quantizes_as_the_checkpoint(weight_only):
    """The same weights as an F32 GGUF (Q/K rows permuted by llama.cpp's converter) give the same artifact weights."""
    from edge.artifact.reader import Artifact

    a, b = (Artifact.open(weight_only[n]["art"]) for n in ("llama_q8", "llama_gguf_q8"))
    assert a.manifest.decoder.param_names == b.manifest.decoder.param_names
    for name, x, y in zip(a.manifest.decoder.param_names, a.load_params(), b.load_params()):
        np.testing.assert_array_equal(x, y, err_msg=name)


# -- bad flags -----------------------------------------------------------------------------------
def test_bad_flags_fail_with_one_line(weight_only, smollm2_gguf, tiny_onnx, tmp_path):
    hf = weight_only["llama_q8"]["fx"]["path"]
    cases = [
        (smollm2_gguf, ["--precision", "q4"], "--precision q4: SmolLM2-135M-Instruct.Q4_1.gguf is already quantized (Q4_1, Q8_0) "
                                              "and keeps its file's quantization"),
        (tiny_onnx, ["--precision", "q8"], "--precision q8 applies to decoders"),
        (hf, ["--min-accuracy", "0.5"], "--min-accuracy applies to a decoder only with --precision q4 or q8"),
        (hf, ["--precision", "q8", "--min-accuracy", "90"], "--min-accuracy 90.0 is not between 0 and 1"),
        (hf, ["--accept-accuracy"], "--accept-accuracy applies to int8 ONNX models and q4/q8 decoders"),
        (hf, ["--precision", "q4", "--min-accuracy", "0.99"], "q4 accuracy below threshold: top-1 agreement 0."),
    ]
    for i, (model, extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = compile_fails(model, out, *extra, message=message)
        assert "Traceback" not in r.stderr and not out.exists(), r.stderr


# -- the bundled SmolLM2 -------------------------------------------------------------------------
def _smollm2_checkpoint(gguf_path: Path, directory: Path) -> Path:
    """The bundled GGUF as a Hugging Face checkpoint directory, by transformers' own GGUF loader
    (dequantized to fp32) and save_pretrained (a gguf-loaded model refuses to save: a plain copy does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype="float32")
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_smollm2_q8_top1_agreement(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct (its Q4_1 file's values in fp32) compiled with --precision q8: measured
    top-1 agreement 0.984 and perplexity ratio 0.9997 on the corpus (docs/generation.md)."""
    from deploy.compiler.decoder import compile_decoder

    hf = _smollm2_checkpoint(Path(smollm2_gguf), tmp_path / "smollm2")
    log = []
    art = compile_decoder(hf, "host", tmp_path / "smollm2.q8", precision="q8", context=512, log=log.append)
    acc = _manifest(art)["accuracy"]
    assert acc["value"] >= 0.95 and abs(acc["perplexity"]["ratio"] - 1) < 0.01, acc
    assert any("q8 accuracy on 256 tokens" in x for x in log)
