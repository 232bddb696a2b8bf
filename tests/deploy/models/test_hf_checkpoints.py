"""Hugging Face checkpoint directories (Llama, Qwen2, Mistral) and Qwen2 GGUF files, against
transformers on the same model object: tiny random-weight models written by transformers'
save_pretrained (fp32 / bf16 / fp16, one file or shards with their index, tied and untied heads,
llama3 RoPE scaling, q/k/v biases, a sliding window), compiled once per session; greedy tokens
equal for 32 steps on three prompts, logits close; the same weights as GGUF (Llama, Qwen2, and
Mistral as llama.cpp writes it: general.architecture llama) give the same tokens;
bad directories fail with one line through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import compile_fails
from tests.fixtures.hf_checkpoints import write_checkpoint, write_gguf
from tests.fixtures.decoding import LOGIT_TOL, N_NEW, PROMPTS, greedy_decode
from tests.fixtures.hf_reference import greedy

LLAMA3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (architecture, write_checkpoint options)
CHECKPOINTS = {
    "llama_gqa_tied": ("llama", dict(seed=1, tie_word_embeddings=True)),
    "llama_untied_bf16_shards_llama3": ("llama", dict(seed=2, tie_word_embeddings=False, num_key_value_heads=4,
                                                      dtype="bfloat16", max_shard_size="2MB", rope_theta=500000.0,
                                                      rope_scaling=LLAMA3)),
    "qwen2_tied": ("qwen2", dict(seed=1, tie_word_embeddings=True, rope_theta=1e6, eos_ids=(2, 1))),
    "qwen2_untied_f16_shards": ("qwen2", dict(seed=2, tie_word_embeddings=False, rope_theta=1e6, dtype="float16",
                                              max_shard_size="2MB")),
    "mistral_window": ("mistral", dict(seed=3, sliding_window=64)),
}
# The same weights as GGUF in llama.cpp's layout: name -> general.architecture (llama.cpp's converter
# writes MistralForCausalLM as llama, without the window: within it the model is the same)
GGUFS = {"llama_gqa_tied": "llama", "qwen2_tied": "qwen2", "mistral_window": "llama"}


@pytest.fixture(scope="session")
def hf_checkpoints(smollm2_gguf, tmp_path_factory):
    """{name: (fixture dict, host artifact)} for every checkpoint and for the GGUF copies ("gguf:<name>")."""
    from deploy.compiler.decoder import compile_decoder

    root = tmp_path_factory.mktemp("hf_checkpoints")
    out = {}
    for name, (arch, opts) in CHECKPOINTS.items():
        fx = write_checkpoint(root / name, arch, smollm2_gguf, **opts)
        out[name] = (fx, compile_decoder(fx["path"], "host", root / f"{name}.art", log=lambda *a: None))
    for name, arch in GGUFS.items():
        fx = out[name][0]
        path = write_gguf(root / f"{name}.gguf", arch, fx["model"], smollm2_gguf)
        out[f"gguf:{name}"] = (fx, compile_decoder(path, "host", root / f"{name}.gguf.art", log=lambda *a: None))
    return out


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    from edge.generate.loader import load_decoder

    return {name: (fx, load_decoder(art, context=min(256, fx["config"].get("sliding_window") or 256), max_batch=2))
            for name, (fx, art) in hf_checkpoints.items()}


def _ours_greedy(model, prompt, n_new):
    return greedy_decode(model.decoder, prompt, n_new)


_REF = {}


def _reference(name, fx, prompt):
    key = (name.removeprefix("gguf:"), prompt)
    if key not in _REF:
        _REF[key] = greedy(fx["model"], PROMPTS[prompt], N_NEW)
    return _REF[key]


@pytest.mark.parametrize("name", list(CHECKPOINTS) + [f"gguf:{n}" for n in GGUFS])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_matches_transformers(loaded, name, prompt):
    fx, model = loaded[name]
    want_toks, want_logits = _reference(name, fx, prompt)
    toks, logits = _ours_greedy(model, PROMPTS[prompt], N_NEW)
    err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    assert err < LOGIT_TOL, f"logits differ by {err:.2e} of scale"
    assert toks == want_toks
    assert len(set(want_toks)) > 3  # the fixture's weights make a non-degenerate sequence


@pytest.mark.parametrize("name", list(GGUFS))
def test_gguf_and_checkpoint_give_the_same_tokens(loaded, name):
    for prompt in PROMPTS.values():
        assert _ours_greedy(loaded[name][1], prompt, N_NEW)[0] == _ours_greedy(loaded[f"gguf:{name}"][1], prompt, N_NEW)[0]


def test_qwen2_biases_are_applied(loaded):
    """Without its q/k/v biases the model gives other logits: the biases are really added."""
    import torch

    fx, model = loaded["qwen2_tied"]
    ref = fx["model"]
    saved = {n: p.detach().clone() for n, p in ref.named_parameters() if n.endswith(".bias")}
    assert len(saved) == 3 * 2
    try:
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in saved:
                    p.zero_()
        _, unbiased = greedy(ref, PROMPTS["chat"], 2)
    finally:
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    _, ours = _ours_greedy(model, PROMPTS["chat"], 2)
    assert np.abs(ours - unbiased).max() > 10 * LOGIT_TOL * np.abs(unbiased).max()


def test_manifest_describes_the_checkpoint(hf_checkpoints):
    from edge.artifact.reader import Artifact

    man = {name: Artifact.open(art).manifest for name, (_, art) in hf_checkpoints.items()}
    d = {name: m.decoder for name, m in man.items()}
    assert [d[n].architecture for n in CHECKPOINTS] == ["llama", "llama", "qwen2", "qwen2", "mistral"]
    assert d["gguf:qwen2_tied"].architecture == "qwen2" and d["qwen2_tied"].config["qkv_bias"]
    assert d["gguf:mistral_window"].architecture == "llama"  # llama.cpp's name for Mistral; no window in the file
    assert not d["llama_gqa_tied"].config["qkv_bias"]
    assert d["qwen2_tied"].config["tie_word_embeddings"] and not d["qwen2_untied_f16_shards"].config["tie_word_embeddings"]
    assert d["qwen2_tied"].config["rope_theta"] == 1e6
    assert d["qwen2_untied_f16_shards"].source == {"format": "hf", "tensor_types": {"F16": 27},
                                                   "architectures": ["Qwen2ForCausalLM"]}
    assert d["llama_untied_bf16_shards_llama3"].source["tensor_types"] == {"BF16": 21}
    shards = sorted(p.name for p in Path(hf_checkpoints["qwen2_untied_f16_shards"][0]["path"]).glob("*.safetensors"))
    assert len(shards) > 1
    # tokenizer_config.json: special tokens and the template; generation_config.json: the stop ids
    tok = d["qwen2_tied"].tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.bos_token, tok.eos_token) == (1, 2, False, "<|im_start|>", "<|im_end|>")
    assert tok.stop_ids == [0, 1, 2] and d["llama_gqa_tied"].tokenizer.stop_ids == [0, 2]  # + <|endoftext|>
    assert d["qwen2_tied"].chat_template == "chat_template.jinja"
    m = man["llama_gqa_tied"].model
    assert (m.name, m.source, len(m.sha256)) == ("llama_gqa_tied", "llama_gqa_tied", 64)
    # a sliding window shorter than the trained context bounds the context
    assert (d["mistral_window"].config["sliding_window"], d["mistral_window"].context_length) == (64, 64)


def test_mistral_context_past_the_window_is_refused_at_load(hf_checkpoints):
    """The compile bounds Mistral's context by its window (test_compile_bad_checkpoint...[window]);
    the runtime refuses a longer one too."""
    from edge.errors import EdgeJitError
    from edge.generate.loader import load_decoder

    with pytest.raises(EdgeJitError, match=r"^context 65 is outside 1\.\.64 \(its sliding attention window\)"):
        load_decoder(hf_checkpoints["mistral_window"][1], context=65)


def test_chat_prompt_matches_transformers_tokenizer(loaded, hf_checkpoints):
    """The shipped tokenizer.json and chat template give the ids transformers gives for the same
    directory (AutoTokenizer + apply_chat_template)."""
    from transformers import AutoTokenizer

    fx, model = loaded["qwen2_tied"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30? Answer in digits."}]
    want = AutoTokenizer.from_pretrained(fx["path"]).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    ours = model.tokenizer.encode(model.template.render(messages, add_generation_prompt=True))
    assert ours == list(want)


def test_llama3_factors_match_the_gguf_converter():
    """config.json's llama3 rope_scaling gives the factors llama.cpp writes as rope_freqs.weight."""
    from deploy.models.llama.loader import llama3_rope_factors
    from deploy.models.llama.model import LlamaConfig
    from tests.fixtures.gguf_llama import llama3_rope_factors as converter

    for theta, hd, scaling in [(500000.0, 16, LLAMA3), (500000.0, 64, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                            original_max_position_embeddings=8192))]:
        cfg = LlamaConfig(hidden_size=hd * 4, intermediate_size=8, num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=1, vocab_size=8, rope_theta=theta)
        want = converter(hd, theta, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                         scaling["original_max_position_embeddings"])
        np.testing.assert_allclose(llama3_rope_factors(cfg, scaling), want, rtol=1e-6)
        assert len(set(want.tolist())) > 2  # low, high and smoothed frequencies all occur


def test_compile_and_generate_without_torch(loaded, hf_checkpoints, tmp_path):
    """`edgejit compile DIR` and `edgejit generate` in processes where torch and transformers cannot
    be imported (safetensors' numpy API reads the weights): the artifact gives transformers' greedy
    tokens and the generated text is their decode."""
    import subprocess
    import sys

    from tokenizers import Tokenizer

    from edge.generate.loader import load_decoder
    from tests.fixtures.cli import ROOT

    fx, _ = loaded["qwen2_untied_f16_shards"]
    blocked = ("import sys; sys.modules.update(torch=None, transformers=None); from edge.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    run = lambda *a: subprocess.run([sys.executable, "-c", blocked, *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=ROOT)
    art = tmp_path / "art"
    r = run("compile", fx["path"], "-o", art)
    assert r.returncode == 0, r.stderr
    text = "The quick brown fox"
    tok = Tokenizer.from_file(str(Path(fx["path"]) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    want = greedy(fx["model"], ids, N_NEW)[0]
    assert _ours_greedy(load_decoder(art, context=256), ids, N_NEW)[0] == want
    r = run("generate", art, "--raw-prompt", text, "--max-tokens", N_NEW, "--ignore-eos", "--no-jit")
    assert r.returncode == 0 and f"generated {N_NEW} tokens" in r.stderr, r.stderr
    assert r.stdout == tok.decode(want) + "\n"


# -- bad directories: one-line errors through the real CLI -----------------------------------------
def _bad_dirs(tmp: Path, good: Path) -> dict:
    def copy(name, edit=None, drop=()):
        d = tmp / name
        shutil.copytree(good, d)
        for f in drop:
            (d / f).unlink()
        if edit:
            cfg = json.loads((d / "config.json").read_text())
            edit(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    (tmp / "empty").mkdir()
    index = json.loads((good / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    return {
        "no_config": (tmp / "empty", [], "empty: no config.json"),
        "no_weights": (copy("no_weights", drop=[p.name for p in good.glob("*.safetensors")] + ["model.safetensors.index.json"]),
                       [], "no_weights: no weights (model.safetensors or *.safetensors shards"),
        "missing_shard": (copy("missing_shard", drop=[lost]), [], f"model.safetensors.index.json names shard {lost}, which is not in"),
        "architecture": (copy("gpt_neox", lambda c: c.update(architectures=["GPTNeoXForCausalLM"])), [],
                         "architecture 'GPTNeoXForCausalLM' is not supported (supported: LlamaForCausalLM, "
                         "Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel)"),
        "dtype": (copy("int8", lambda c: c.update(dtype="int8")), [],
                  "torch_dtype 'int8' is not supported (supported: float32, float16, bfloat16)"),
        "shape": (copy("shape", lambda c: c.update(intermediate_size=96)), [],
                  f"shape/{index['weight_map']['model.layers.0.mlp.gate_proj.weight']}: tensor model.layers.0.mlp.gate_proj.weight "
                  "has shape [128, 64], but config.json implies [96, 64]"),  # the shard that holds it
        "no_tokenizer": (copy("no_tokenizer", drop=["tokenizer.json"]), [], "no_tokenizer: no tokenizer.json"),
        "onnx_option": (good, ["--precision", "int8"], "--precision int8 applies to ONNX tensor models, not to Hugging Face checkpoints"),
        "window": (good.parent / "mistral_window", ["--context", "128"],
                   "--context 128 is longer than the model's sliding attention window (64)"),
    }


@pytest.fixture(scope="module")
def bad_dirs(hf_checkpoints, tmp_path_factory):
    return _bad_dirs(tmp_path_factory.mktemp("bad_hf"), Path(hf_checkpoints["qwen2_untied_f16_shards"][0]["path"]))


@pytest.mark.parametrize("case", ["no_config", "no_weights", "missing_shard", "architecture", "dtype", "shape",
                                  "no_tokenizer", "onnx_option", "window"])
def test_compile_bad_checkpoint_fails_with_one_line(bad_dirs, case, tmp_path):
    path, extra, message = bad_dirs[case]
    out = tmp_path / "out"
    r = compile_fails(path, out, *extra, message=message)
    # the context is checked once the model is read (its summary line is on stdout)
    assert "Traceback" not in r.stderr and (r.stdout == "" or case == "window"), r.stderr + r.stdout
    assert not out.exists()
