"""GPT-2 (deploy/models/gpt2) against transformers' GPT2LMHeadModel on the same weights: tiny
random-weight models saved by transformers (tied fp32 with GPT-2's own gelu_new; untied fp16 with
another LayerNorm eps and a 64-row position table; exact GELU with unscaled attention scores), the same
weights as GGUF in llama.cpp's gpt2 layout (F32, and Q4_1 kept quantized), each compiled once per
session; greedy tokens equal for 32 steps on three prompts and logits within LOGIT_TOL; positions
up to the table's last row; batches and chunked prefill; bad input fails with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import compile_fails
from tests.fixtures.decoding import LOGIT_TOL, N_NEW, PROMPTS, greedy_decode
from tests.fixtures.gguf_gpt2 import write_gpt2_checkpoint, write_gpt2_gguf
from tests.fixtures.hf_reference import greedy, load_gguf_model

CHECKPOINTS = {  # name -> write_gpt2_checkpoint options
    "tied": dict(seed=1),
    "untied_f16": dict(seed=2, tie_word_embeddings=False, dtype="float16", layer_norm_epsilon=1e-3, n_positions=64),
    # options a GGUF file cannot carry (llama.cpp's gpt2 is always tanh GELU and scaled scores)
    "erf_gelu_unscaled": dict(seed=3, activation_function="gelu", scale_attn_weights=False),
}
# the fp16 checkpoint as an F16 file: its matrices stay fp16 in the artifact (widened in the kernel)
GGUFS = {"gguf:tied": ("tied", "F32"), "gguf:untied_f16": ("untied_f16", "F16"), "gguf_q4_1:tied": ("tied", "Q4_1")}


@pytest.fixture(scope="session")
def gpt2_models(smollm2_gguf, tmp_path_factory):
    """{name: (fixture dict, reference transformers model, host artifact)}. The reference of a GGUF
    file is the checkpoint's model when the file holds its exact values (F32, or F16 of the fp16
    checkpoint), else transformers' own GGUF loader (the file's dequantized values)."""
    from deploy.compiler.decoder import compile_decoder

    root = tmp_path_factory.mktemp("gpt2")
    quiet = lambda *a: None  # noqa: E731
    out = {}
    for name, opts in CHECKPOINTS.items():
        fx = write_gpt2_checkpoint(root / name, smollm2_gguf, **opts)
        out[name] = (fx, fx["model"], compile_decoder(fx["path"], "host", root / f"{name}.art", log=quiet))
    for name, (source, weight_type) in GGUFS.items():
        fx = out[source][0]
        path = write_gpt2_gguf(root / f"{name.replace(':', '_')}.gguf", fx["model"], smollm2_gguf, weight_type=weight_type)
        ref = fx["model"] if weight_type in ("F32", "F16") else load_gguf_model(path)
        out[name] = ({**fx, "gguf": path}, ref, compile_decoder(path, "host", root / f"{name.replace(':', '_')}.art", log=quiet))
    return out


@pytest.fixture(scope="module")
def loaded(gpt2_models):
    from edge.generate.loader import load_decoder

    return {name: load_decoder(art, context=min(128, fx["config"]["n_positions"]), max_batch=3)
            for name, (fx, _, art) in gpt2_models.items()}


_REF = {}


def _reference(gpt2_models, name, prompt, n_new=N_NEW):
    key = (name if name.startswith("gguf_q") else name.removeprefix("gguf:"), tuple(prompt), n_new)
    if key not in _REF:
        _REF[key] = greedy(gpt2_models[name][1], prompt, n_new)
    return _REF[key]


@pytest.mark.parametrize("name", list(CHECKPOINTS) + list(GGUFS))
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_matches_transformers(gpt2_models, loaded, name, prompt):
    want_toks, want_logits = _reference(gpt2_models, name, PROMPTS[prompt])
    toks, logits = greedy_decode(loaded[name].decoder, PROMPTS[prompt], N_NEW)
    err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    assert err < LOGIT_TOL, f"logits differ by {err:.2e} of scale"
    assert toks == want_toks
    assert len(set(want_toks)) > 3  # the fixture's weights make a non-degenerate sequence


def test_f16_batch1_step_matches_transformers(gpt2_models, tmp_path):
    """The F16 file compiled as `edgejit compile` does (the batch-1 decode step in the artifact,
    whose fp16 matmuls take edge/kernels/dense_f16.py): greedy tokens equal transformers', logits
    within the tolerance, and the steps ran on the artifact's variant."""
    from deploy.compiler.decoder import compile_decoder
    from edge.generate.loader import load_decoder

    fx, _, _ = gpt2_models["gguf:untied_f16"]
    art = compile_decoder(fx["gguf"], "host", tmp_path / "f16.art", decode_variants=(1,), log=lambda *a: None)
    dec = load_decoder(art, context=64, jit="default", cache_dir=tmp_path / "c", state_dir=tmp_path / "s").decoder
    for prompt in PROMPTS.values():
        want_toks, want_logits = _reference(gpt2_models, "gguf:untied_f16", prompt)
        toks, logits = greedy_decode(dec, prompt, N_NEW)
        assert toks == want_toks
        assert np.abs(logits - want_logits).max() < LOGIT_TOL * np.abs(want_logits).max()
    assert dec.specializer.stats()["variants"][1]["source"] == "artifact"


def test_positions_up_to_the_last_row_of_the_table(gpt2_models, loaded):
    """A sequence filling the whole context (64 positions) matches transformers at every step, so
    decode step p adds wpe[p] up to the last row; one more token is refused, not clamped."""
    from edge.errors import EdgeJitError

    prompt = (PROMPTS["chat"] * 3)[:53]
    want_toks, want_logits = _reference(gpt2_models, "untied_f16", prompt, 11)
    dec = loaded["untied_f16"].decoder
    toks, logits = greedy_decode(dec, prompt, 11)  # the last decode step is at position 63
    assert toks == want_toks
    assert np.abs(logits - want_logits).max() < LOGIT_TOL * np.abs(want_logits).max()
    dec.add_sequence(7)
    try:
        dec.prefill([7], [prompt + toks[:-1]])
        dec.decode([7], [toks[-1]])
        with pytest.raises(EdgeJitError, match="context"):
            dec.decode([7], [toks[-1]])
    finally:
        dec.remove_sequence(7)


def test_batched_decode_and_chunked_prefill_match_single_sequences(loaded):
    """Three prompts of different lengths prefilled in one ragged call and decoded together give
    each one's tokens alone (each sequence's own positions), and a prompt split into prefill
    chunks gives the logits of one call."""
    from edge.generate.loader import load_decoder

    model = loaded["tied"]
    prompts = list(PROMPTS.values())
    alone = [greedy_decode(model.decoder, p, 12)[0] for p in prompts]
    dec = model.decoder
    ids = [10, 11, 12]
    for s in ids:
        dec.add_sequence(s)
    try:
        toks = [[int(np.argmax(row))] for row in dec.prefill(ids, prompts)]
        for _ in range(11):
            for t, row in zip(toks, dec.decode(ids, [t[-1] for t in toks])):
                t.append(int(np.argmax(row)))
    finally:
        for s in ids:
            dec.remove_sequence(s)
    assert toks == alone

    prompt = (PROMPTS["chat"] * 4)[:70]
    small = load_decoder(model.artifact.path, context=128)
    small.decoder.prefill_chunk = 16
    np.testing.assert_allclose(greedy_decode(small.decoder, prompt, 3)[1], greedy_decode(dec, prompt, 3)[1],
                               atol=1e-4 * np.abs(greedy_decode(dec, prompt, 1)[1]).max())


def test_manifest_and_weights(gpt2_models):
    from edge.artifact.reader import Artifact

    man = {name: Artifact.open(art).manifest for name, (_, _, art) in gpt2_models.items()}
    d = {name: m.decoder for name, m in man.items()}
    assert {x.architecture for x in d.values()} == {"gpt2"}
    assert d["tied"].config["tie_word_embeddings"] and not d["gguf:untied_f16"].config["tie_word_embeddings"]
    assert (d["erf_gelu_unscaled"].config["activation"], d["tied"].config["activation"]) == ("gelu", "gelu_tanh")
    assert not d["erf_gelu_unscaled"].config["scale_attn_weights"] and d["tied"].config["scale_attn_weights"]
    assert d["untied_f16"].config["layer_norm_eps"] == 1e-3
    assert d["gguf:untied_f16"].config["layer_norm_eps"] == pytest.approx(1e-3)  # GGUF stores float32
    assert (d["tied"].context_length, d["untied_f16"].context_length, d["gguf:untied_f16"].context_length) == (1024, 64, 64)
    assert d["untied_f16"].source == {"format": "hf", "tensor_types": {"F16": 29},  # 28 + the untied lm_head
                                      "architectures": ["GPT2LMHeadModel"]}
    # Q4_1 kept quantized: the head (tied embedding) and the 8 Conv1D matrices
    assert man["gguf_q4_1:tied"].precision == "wq4" and man["gguf_q4_1:tied"].quantization["layers"] == {"q4": 9}
    assert d["gguf_q4_1:tied"].weight_bytes < 0.35 * d["gguf:tied"].weight_bytes
    assert man["gguf:tied"].precision == "fp32"


def test_params_from_a_transformers_state_dict(gpt2_models):
    """gpt2.params on transformers' own state_dict (what an ONNX export's weights map onto) gives
    the parameters the compile wrote, and a checkpoint saved without the `transformer.` prefix (as
    the original GPT-2 checkpoints are, with their attention-mask buffers) reads the same."""
    from safetensors.numpy import save_file

    from deploy.frontends.hf.checkpoint import Checkpoint
    from deploy.models import gpt2
    from edge.artifact.reader import Artifact

    fx, model, art = gpt2_models["tied"]
    cfg = gpt2.config_from_hf(json.loads((Path(fx["path"]) / "config.json").read_text()))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = gpt2.params(sd, cfg)
    a = Artifact.open(art)
    with np.load(a.file("params.npz"), allow_pickle=False) as z:
        written = {n: z[f"p{i}"] for i, n in enumerate(a.manifest.decoder.param_names)}
    assert sorted(ours) == sorted(written)
    for n, v in ours.items():
        np.testing.assert_array_equal(v, written[n], err_msg=n)

    bare = Path(fx["path"]).parent / "tied_unprefixed"
    shutil.copytree(fx["path"], bare)
    (bare / "model.safetensors").unlink()
    flat = {k.removeprefix("transformer."): np.ascontiguousarray(v) for k, v in sd.items() if k != "lm_head.weight"}
    flat |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 8, 8), np.float32)) for i in range(cfg.num_hidden_layers)}
    save_file(flat, str(bare / "model.safetensors"))
    again = gpt2.weights_from_hf(Checkpoint(bare), cfg)
    assert sorted(again) == sorted(k for k in sd if k != "lm_head.weight")
    for n, v in again.items():
        np.testing.assert_array_equal(v, sd[n], err_msg=n)


def test_config_refusals():
    from deploy.models import gpt2
    from edge.errors import ModelError

    base = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=100)
    for change, message in [
        (dict(activation_function="relu"), "c.json: activation_function 'relu' is not supported (supported: gelu_new, "
                                           "gelu_pytorch_tanh, gelu_fast, gelu)"),
        (dict(add_cross_attention=True), "c.json: add_cross_attention=true is not supported for GPT-2"),
        (dict(n_head=5), "c.json: n_embd 64 is not a multiple of n_head 5"),
        (dict(n_positions=None), "c.json: no 'n_positions'"),
    ]:
        with pytest.raises(ModelError) as e:
            gpt2.config_from_hf({k: v for k, v in (base | change).items() if v is not None}, "c.json")
        assert str(e.value) == message


# -- bad input: one-line errors through the real CLI -----------------------------------------------
def _edited(tmp: Path, good: Path, name: str, **changes) -> Path:
    d = tmp / name
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case", ["context_hf", "context_gguf", "inverse_layer_idx", "shape"])
def test_bad_gpt2_input_fails_with_one_line(gpt2_models, case, tmp_path):
    good = Path(gpt2_models["tied"][0]["path"])
    path, extra, message = {
        "context_hf": (good, ["--context", "1025"], "--context 1025 is outside 1..1024 (the model's trained context)"),
        "context_gguf": (gpt2_models["gguf:untied_f16"][0]["gguf"], ["--context", "65"], "--context 65 is outside 1..64"),
        "inverse_layer_idx": (_edited(tmp_path, good, "layer_idx", scale_attn_by_inverse_layer_idx=True), [],
                              "config.json: scale_attn_by_inverse_layer_idx=true is not supported for GPT-2"),
        "shape": (_edited(tmp_path, good, "shape", n_inner=128), [],
                  "shape/model.safetensors: tensor transformer.h.0.mlp.c_fc.weight has shape [64, 256], but config.json "
                  "implies [64, 128]"),
    }[case]
    out = tmp_path / "out"
    r = compile_fails(path, out, *extra, message=message)
    assert "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
