"""Llama from GGUF, against transformers on the same weights: tiny random-weight configs (GQA with a
tied head, an untied head, llama3 RoPE scaling) written as llama.cpp's converter writes them,
compiled once per session; greedy tokens equal, logits close; batches and chunked prefill agree
with one sequence at a time; every GGUF weight type reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.gguf_llama import WEIGHT_TYPES, K_QUANTS, write_llama_gguf
from tests.fixtures.decoding import LOGIT_TOL, N_NEW, PROMPTS, greedy_decode
from tests.fixtures.hf_reference import greedy, hf_model



def _ours_greedy(loaded, prompt, n_new, seq_id=0):
    return greedy_decode(loaded.decoder, prompt, n_new, seq_id)


@pytest.fixture(scope="module")
def loaded(tiny_llamas):
    from edge.generate.loader import load_decoder

    return {name: (fx, load_decoder(art, context=256, max_batch=4)) for name, (fx, art) in tiny_llamas.items()}


@pytest.mark.parametrize("config", ["gqa_tied", "untied_mha", "llama3_scaling", "q4_1_gqa", "q4_0_untied", "q8_0_gqa", "f16_gqa"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_matches_transformers(loaded, config, prompt):
    """fp32 files run fp32 kernels; Q4_0/Q4_1/Q8_0 files keep their quantization (weight-only
    kernels dequantize in the inner loop) and must still match transformers on the file's values."""
    fx, model = loaded[config]
    ref = hf_model(fx["config"], fx["state_dict"])
    want_toks, want_logits = greedy(ref, PROMPTS[prompt], N_NEW)
    toks, logits = _ours_greedy(model, PROMPTS[prompt], N_NEW)
    err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    assert err < LOGIT_TOL, f"logits differ by {err:.2e} of scale"
    assert toks == want_toks
    assert len(set(want_toks)) > 3  # the fixture's weights make a non-degenerate sequence


def test_tied_and_untied_heads_are_what_the_file_says(tiny_llamas):
    from edge.artifact.reader import Artifact

    cfg = {name: Artifact.open(art).manifest.decoder.config for name, (_, art) in tiny_llamas.items()}
    assert cfg["gqa_tied"]["tie_word_embeddings"] and not cfg["untied_mha"]["tie_word_embeddings"]
    assert (cfg["gqa_tied"]["num_attention_heads"], cfg["gqa_tied"]["num_key_value_heads"]) == (4, 2)


def test_llama3_scaling_changes_the_result(loaded):
    """The rope_freqs tensor is applied: without it (transformers' plain RoPE) logits differ."""
    fx, model = loaded["llama3_scaling"]
    plain = dict(fx["config"])
    plain.pop("rope_scaling")
    _, unscaled = greedy(hf_model(plain, fx["state_dict"]), PROMPTS["chat"], 4)
    _, ours = _ours_greedy(model, PROMPTS["chat"], 4)
    assert np.abs(ours - unscaled).max() > 100 * LOGIT_TOL * np.abs(unscaled).max()


def test_batched_decode_and_ragged_prefill_match_single_sequences(loaded):
    """Three sequences prefilled in one ragged call and decoded together give the tokens each
    gives alone: the batch dimension really is independent sequences over one KV cache."""
    fx, model = loaded["gqa_tied"]
    prompts = list(PROMPTS.values())
    alone = [_ours_greedy(model, p, 12)[0] for p in prompts]
    dec = model.decoder
    ids = [10, 11, 12]
    for s in ids:
        dec.add_sequence(s)
    try:
        logits = dec.prefill(ids, prompts)
        toks = [[int(np.argmax(row))] for row in logits]
        for _ in range(11):
            logits = dec.decode(ids, [t[-1] for t in toks])
            for t, row in zip(toks, logits):
                t.append(int(np.argmax(row)))
    finally:
        for s in ids:
            dec.remove_sequence(s)
    assert toks == alone


def test_prompt_longer_than_a_prefill_chunk(tiny_llamas):
    """A prompt split into several prefill calls gives the logits of one call."""
    from edge.generate.loader import load_decoder

    fx, art = tiny_llamas["gqa_tied"]
    prompt = (PROMPTS["chat"] * 4)[:70]
    small = load_decoder(art, context=256)
    small.decoder.prefill_chunk = 16
    whole = load_decoder(art, context=256)
    a = _ours_greedy(small, prompt, 3)[1]
    b = _ours_greedy(whole, prompt, 3)[1]
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    ref = greedy(hf_model(fx["config"], fx["state_dict"]), prompt, 3)[1]
    assert np.abs(a - ref).max() < LOGIT_TOL * np.abs(ref).max()


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_every_weight_type_reads_back_exactly(smollm2_gguf, tmp_path, weight_type):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the k-quants dequantize to the values the file holds
    (the fixture's own round trip), with llama.cpp's Q/K row permutation undone."""
    from deploy.frontends.gguf.reader import GGUFFile
    from deploy.models import llama

    size = dict(hidden=256, ffn=512, heads=4, kv_heads=2, layers=1) if weight_type in K_QUANTS else {}
    fx = write_llama_gguf(tmp_path / "m.gguf", smollm2_gguf, weight_type=weight_type, **size)
    f = GGUFFile(fx["path"])
    ours = llama.weights_from_gguf(f, llama.config_from_gguf(f))
    for name, want in fx["state_dict"].items():
        if name == "lm_head.weight":
            continue  # tied: the embedding
        np.testing.assert_array_equal(ours[name], want, err_msg=name)


def test_quantized_files_stay_quantized(tiny_llamas):
    """Q4_x/Q8_0 matrices are repacked and F16 ones stay fp16, never expanded to fp32: the
    artifact's weights are a fraction of the fp32 ones and the manifest says so."""
    from edge.artifact.reader import Artifact

    size = {name: Artifact.open(art).manifest.decoder.weight_bytes for name, (_, art) in tiny_llamas.items()}
    m = Artifact.open(tiny_llamas["q4_1_gqa"][1]).manifest
    assert m.precision == "wq4/q8" and m.quantization["layers"] == {"q4": 8, "q8": 1}
    assert Artifact.open(tiny_llamas["q8_0_gqa"][1]).manifest.precision == "wq8"
    # Q8_0 is symmetric (w = d * q): no zero tensor, for the 4-bit layers (Q4_1) one beside the codes
    q8_names = Artifact.open(tiny_llamas["q8_0_gqa"][1]).manifest.decoder.param_names
    assert any(n.endswith(".qscale") for n in q8_names) and not any(n.endswith(".qzero") for n in q8_names)
    q4_names = m.decoder.param_names
    assert "lm_head.qzero" not in q4_names and "layers.0.mlp.down_proj.qzero" in q4_names
    assert size["q4_1_gqa"] < 0.35 * size["gqa_tied"] and size["q8_0_gqa"] < 0.35 * size["gqa_tied"]
    f16 = Artifact.open(tiny_llamas["f16_gqa"][1]).manifest  # F16 matrices stay fp16: half the bytes
    assert f16.precision == "wf16" and f16.quantization["layers"] == {"f16": 9}
    assert size["f16_gqa"] < 0.6 * size["gqa_tied"]


def test_fp16_kv_cache_tracks_transformers(tiny_llamas, tmp_path):
    """`--kv-cache fp16`: half the KV bytes per token, and every step's logits (prompt split over
    prefill chunks, so later chunks attend to fp16 pages too) stay within 2x the fp32 tolerance of
    transformers, the tokens the same."""
    from deploy.compiler.decoder import compile_decoder
    from edge.artifact.reader import Artifact
    from edge.generate.loader import load_decoder

    fx, fp32_art = tiny_llamas["gqa_tied"]
    art = compile_decoder(fx["path"], "host", tmp_path / "fp16kv", kv_cache="fp16", log=lambda *a: None)
    info = Artifact.open(art).manifest.decoder
    assert info.config["kv_cache_dtype"] == "float16"
    assert 2 * info.kv_bytes_per_token == Artifact.open(fp32_art).manifest.decoder.kv_bytes_per_token
    ref = hf_model(fx["config"], fx["state_dict"])
    model = load_decoder(art, context=256)
    model.decoder.prefill_chunk = 16
    for prompt in (PROMPTS["chat"], (PROMPTS["chat"] * 4)[:70]):
        want_toks, want_logits = greedy(ref, prompt, N_NEW)
        toks, logits = _ours_greedy(model, prompt, N_NEW)
        err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
        assert err < 2 * LOGIT_TOL, f"logits differ by {err:.2e} of scale"
        assert toks == want_toks
