"""ONNX decoders with past key values (optimum's layout, written with torch.onnx by
deploy/tools/examples.export_decoder_with_past): tiny random-weight Llama (GQA), Qwen2 (q/k/v biases,
untied head), Mistral (sliding window), GPT-2 and a dynamo-exported Llama with llama3 RoPE scaling
and no config.json, compiled once per session through their weights' mapping onto our model definition;
greedy tokens equal transformers' for 32 steps on three prompts, logits close; the compile-time
check against ONNX Runtime catches a wrong mapping; bad graphs fail with one line through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import compile_fails
from tests.fixtures.decoding import LOGIT_TOL, N_NEW, PROMPTS, greedy_decode
from tests.fixtures.hf_reference import greedy
from tests.fixtures.onnx_decoders import write_onnx_decoder

pytestmark = pytest.mark.slow

LLAMA3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
# name -> (architecture, write_onnx_decoder options)
DECODERS = {
    "llama_gqa": ("llama", dict(seed=1, tie_word_embeddings=True)),
    "qwen2_bias_untied": ("qwen2", dict(seed=2, tie_word_embeddings=False, rope_theta=1e6)),
    "mistral_window": ("mistral", dict(seed=3, sliding_window=64)),
    "llama3_dynamo_no_config": ("llama", dict(seed=4, tie_word_embeddings=False, num_key_value_heads=4, rope_theta=500000.0,
                                              rope_scaling=LLAMA3, exporter="dynamo", config_json=False)),
    "gpt2": ("gpt2", dict(seed=5, n_positions=128)),
}


@pytest.fixture(scope="session")
def onnx_decoders(smollm2_gguf, tmp_path_factory):
    """{name: (fixture dict, host artifact)}: each exported and compiled once."""
    from deploy.compiler.decoder import compile_decoder

    root = tmp_path_factory.mktemp("onnx_decoders")
    out = {}
    for name, (arch, opts) in DECODERS.items():
        fx = write_onnx_decoder(root / name, arch, smollm2_gguf, **opts)
        out[name] = (fx, compile_decoder(fx["path"], "host", root / f"{name}.art", log=lambda *a: None))
    return out


@pytest.fixture(scope="module")
def loaded(onnx_decoders):
    from edge.generate.loader import load_decoder

    return {name: (fx, load_decoder(art, context=64, max_batch=1)) for name, (fx, art) in onnx_decoders.items()}


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_matches_transformers(loaded, name, prompt):
    fx, model = loaded[name]
    want_toks, want_logits = greedy(fx["model"], PROMPTS[prompt], N_NEW)
    toks, logits = greedy_decode(model.decoder, PROMPTS[prompt], N_NEW)
    err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    assert err < LOGIT_TOL, f"logits differ by {err:.2e} of scale"
    assert toks == want_toks
    assert len(set(want_toks)) > 3  # the fixture's weights make a non-degenerate sequence


def test_manifest_describes_the_graph(onnx_decoders):
    from edge.artifact.reader import Artifact

    d = {name: Artifact.open(art).manifest.decoder for name, (_, art) in onnx_decoders.items()}
    assert [d[n].architecture for n in DECODERS] == ["llama", "qwen2", "mistral", "llama", "gpt2"]
    for name, info in d.items():
        src = info.source
        assert (src["format"], src["file"]) == ("onnx", "model.onnx")
        assert src["check"]["max_rel_diff"] < 1e-4 and src["check"]["prompt_tokens"] == 7, name
    assert d["llama_gqa"].source["config"] == "config.json" and d["llama3_dynamo_no_config"].source["config"] == "graph"
    assert d["qwen2_bias_untied"].config["qkv_bias"] and not d["qwen2_bias_untied"].config["tie_word_embeddings"]
    assert d["llama_gqa"].config["num_key_value_heads"] == 2 and d["llama_gqa"].config["tie_word_embeddings"]
    assert (d["mistral_window"].config["sliding_window"], d["mistral_window"].context_length) == (64, 64)
    # without config.json: shapes, eps and the untied head read from the graph (context unknown: the default)
    cfg = d["llama3_dynamo_no_config"].config
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (4, 4, 16, 128)
    assert cfg["rms_norm_eps"] == 1e-5 and not cfg["tie_word_embeddings"]
    assert (d["gpt2"].config["layer_norm_eps"], d["gpt2"].context_length, d["gpt2"].config["tie_word_embeddings"]) == (1e-5, 128, True)
    assert d["llama_gqa"].tokenizer.stop_ids == [0, 2]


def test_the_check_against_onnxruntime_catches_a_wrong_mapping(onnx_decoders, monkeypatch):
    """Swap two weights after the structural mapping: the compile-time check must refuse."""
    from edge.errors import ModelError

    from deploy.frontends.onnx import decoder
    from deploy.frontends.onnx.decoder import structure

    real = structure.map_graph

    def swapped(g):
        m = real(g)
        s = m.state
        a, b = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
        s[a], s[b] = s[b], s[a]
        return m

    monkeypatch.setattr(structure, "map_graph", swapped)
    with pytest.raises(ModelError, match="do not reproduce it: logits differ from ONNX Runtime's by"):
        decoder.read(onnx_decoders["llama_gqa"][0]["path"], log=lambda *a: None)


# -- bad input: one-line errors through the real CLI ----------------------------------------------
def _graph(path: Path, inputs: list[str], outputs: list[str]) -> Path:
    """A hand-built graph with these inputs and outputs (each output an Identity of the first input)."""
    import onnx
    from onnx import TensorProto, helper

    def vi(name):
        if name in ("input_ids", "attention_mask", "position_ids", "token_type_ids"):
            return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, "past", 16])

    nodes = [helper.make_node("Identity", [inputs[-1]], [o]) for o in outputs]
    g = helper.make_graph(nodes, "g", [vi(i) for i in inputs], [vi(o) for o in outputs])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _merged(path: Path) -> Path:
    """A graph shaped like optimum's merged decoder: an If on use_cache_branch."""
    import onnx
    from onnx import TensorProto, helper

    def vi(name, t=TensorProto.FLOAT, shape=("batch", 2, "past", 16)):
        return helper.make_tensor_value_info(name, t, list(shape))

    branch = [helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], [y])], y, [], [vi(y)]) for y in ("a", "b")]
    nodes = [helper.make_node("If", ["use_cache_branch"], ["logits"], then_branch=branch[0], else_branch=branch[1], name="optimum::if"),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    inputs = [vi("input_ids", TensorProto.INT64, ("batch", "seq")), vi("past_key_values.0.key"), vi("past_key_values.0.value"),
              vi("use_cache_branch", TensorProto.BOOL, (1,))]
    g = helper.make_graph(nodes, "merged", inputs, [vi("logits"), vi("present.0.key"), vi("present.0.value")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _contrib(path: Path) -> Path:
    """A decoder-shaped graph with an ONNX Runtime contrib operator, as ORT GenAI's model builder writes."""
    import onnx
    from onnx import TensorProto, helper

    def vi(name, t=TensorProto.FLOAT, shape=("batch", 2, "past", 16)):
        return helper.make_tensor_value_info(name, t, list(shape))

    past = ["past_key_values.0.key", "past_key_values.0.value"]
    nodes = [helper.make_node("GroupQueryAttention", ["input_ids", *past], ["logits", "present.0.key", "present.0.value"],
                              domain="com.microsoft", name="gqa")]
    g = helper.make_graph(nodes, "gqa", [vi("input_ids", TensorProto.INT64, ("batch", "seq")), *map(vi, past)],
                          [vi("logits"), vi("present.0.key"), vi("present.0.value")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), str(path))
    return path


def _bad_inputs(tmp: Path, good: Path, bert_onnx) -> dict:
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

    encoder = tmp / "encoder"
    encoder.mkdir()
    shutil.copy(bert_onnx, encoder / "model.onnx")
    past = ["past_key_values.0.key", "past_key_values.0.value"]
    return {
        "encoder_dir": (encoder, [], "model.onnx: not a decoder: no logits output (outputs: last_hidden_state, pooler_output)"),
        "foreign_input": (_graph(tmp / "foreign.onnx", ["input_ids", "token_type_ids", *past], ["logits", "present.0.key", "present.0.value"]),
                          [], "foreign.onnx: input 'token_type_ids' is not a decoder input"),
        "no_present": (_graph(tmp / "no_present.onnx", ["input_ids", "attention_mask", *past], ["logits"]),
                       [], "no_present.onnx: 0 present.N.key/value outputs for 1 layers of past_key_values"),
        "half_past": (_graph(tmp / "half_past.onnx", ["input_ids", past[0]], ["logits", "present.0.key"]),
                      [], "half_past.onnx: past_key_values.0.key/value missing"),
        "not_a_model": (_graph(tmp / "identity.onnx", ["input_ids", *past], ["logits", "present.0.key", "present.0.value"]),
                        [], "identity.onnx: the graph's 0 linear layers do not form a Llama / Qwen2 / Mistral or GPT-2 decoder"),
        "merged": (_merged(tmp / "decoder_model_merged.onnx"), [],
                   "decoder_model_merged.onnx: control flow (If at node 'optimum::if', e.g. optimum's merged decoder) is not read"),
        "contrib": (_contrib(tmp / "gqa.onnx"), [], "gqa.onnx: operator com.microsoft.GroupQueryAttention at node 'gqa' (an ONNX "
                    "Runtime-optimized or quantized graph) is not read"),
        "config_disagrees": (copy("heads", lambda c: c.update(num_attention_heads=2, head_dim=16)), [],
                             "config.json: num_attention_heads is 2, but the graph model.onnx has 4"),
        "architecture": (copy("arch", lambda c: c.update(architectures=["GPTNeoXForCausalLM"])), [],
                         "architecture 'GPTNeoXForCausalLM' is not supported"),
        "no_tokenizer": (copy("no_tokenizer", drop=["tokenizer.json"]), [], "no_tokenizer: no tokenizer.json"),
        "onnx_option": (good / "model.onnx", ["--max-seq", "64"], "--max-seq applies to ONNX models, not to ONNX decoders with past key values"),
    }


@pytest.fixture(scope="module")
def bad_inputs(onnx_decoders, bert_onnx, tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad_onnx"), Path(onnx_decoders["llama_gqa"][0]["path"]), bert_onnx)


CLI_CASES = ["encoder_dir", "config_disagrees", "onnx_option"]  # the rest in-process: the same error, no process start


@pytest.mark.parametrize("case", CLI_CASES)
def test_compile_bad_graph_fails_with_one_line(bad_inputs, case, tmp_path):
    path, extra, message = bad_inputs[case]
    out = tmp_path / "out"
    r = compile_fails(path, out, *extra, message=message)
    assert "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["foreign_input", "no_present", "half_past", "not_a_model", "merged", "contrib",
                                  "architecture", "no_tokenizer"])
def test_bad_graph_is_refused_in_one_line(bad_inputs, case, tmp_path):
    from edge.errors import ModelError

    from deploy.compiler.decoder import compile_decoder

    path, extra, message = bad_inputs[case]
    assert not extra
    with pytest.raises(ModelError) as e:
        compile_decoder(path, "host", tmp_path / "out", log=lambda *a: None)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_decoder_without_past_gets_a_clear_message(gpt2_onnx, tmp_path):
    """`edgejit compile` keeps a graph without past as a tensor model and says so (`edgejit generate`
    then refuses the artifact); asked to compile it for generation, the decoder compile refuses it in
    one line."""
    from edge.errors import ModelError

    from deploy.compiler.decoder import compile_decoder
    from deploy.frontends.onnx.decoder import kind

    assert kind(gpt2_onnx) == "without_past"
    with pytest.raises(ModelError, match=r"a decoder without past key values .* export it with past \(optimum-cli export onnx "
                                         r"--task text-generation-with-past\)"):
        compile_decoder(gpt2_onnx, "host", tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()

    import subprocess
    import sys

    from tests.fixtures.cli import ROOT

    run = lambda *a: subprocess.run([sys.executable, "-m", "edge.cli", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=ROOT)
    r = run("compile", gpt2_onnx, "-o", tmp_path / "tensor")
    assert r.returncode == 0, r.stderr
    assert "note: model.onnx has no past_key_values inputs: compiled as a tensor model" in r.stdout
    r = run("generate", tmp_path / "tensor", "--raw-prompt", "hi")
    assert r.returncode == 1 and "not a text-generation model" in r.stderr.strip().splitlines()[-1], r.stderr


def test_gpt2_example_generates_text(smollm2_gguf, tmp_path):
    """`edgejit example --model gpt2` (here at 1 layer) writes optimum's layout with a tokenizer;
    `edgejit compile DIR` and `edgejit generate --raw-prompt` give text with our KV cache."""
    import subprocess
    import sys

    from deploy.tools import examples
    from tests.fixtures.cli import ROOT

    d = examples.write_gpt2_decoder(tmp_path, n_layer=1, n_embd=64, n_head=4, log=lambda *a: None)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model.onnx", "tokenizer.json",
                                                   "tokenizer_config.json"]
    art = tmp_path / "gpt2-art"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge.cli", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=ROOT)
    r = run("compile", d, "-o", art)
    assert r.returncode == 0 and "checked the mapping against ONNX Runtime" in r.stdout, r.stderr
    r = run("generate", art, "--raw-prompt", "Once upon a time", "--max-tokens", "8", "--ignore-eos", "--no-jit")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "generated 8 tokens" in r.stderr


def test_fp16_graph_is_read_and_checked(smollm2_gguf, tmp_path):
    """A graph exported in float16: weights read as fp32, the check runs ONNX Runtime in fp16
    (within its looser tolerance) and the mapped weights are the fp16 values exactly."""
    from deploy.frontends.onnx import decoder
    from deploy.tools.examples import export_decoder_with_past
    from tests.fixtures.hf_checkpoints import write_checkpoint, write_tokenizer

    fx = write_checkpoint(tmp_path / "hf", "qwen2", smollm2_gguf, seed=6)
    model = fx["model"].half()
    export_decoder_with_past(model, tmp_path / "onnx")
    write_tokenizer(tmp_path / "onnx", smollm2_gguf, eos_ids=[2])
    d = decoder.read(tmp_path / "onnx", log=lambda *a: None)
    assert d.arch == "qwen2" and d.source["check"]["max_rel_diff"] < 3e-2
    want = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].float().numpy()
    np.testing.assert_array_equal(d.weights["model.layers.1.self_attn.k_proj.weight"], want)


def test_smollm2_from_all_three_formats_gives_the_same_tokens(smollm2_gguf, smollm2_fp32_artifact, tmp_path):
    """A real checkpoint from every input format: SmolLM2-135M-Instruct (30 layers, GQA 9/3) as
    transformers loads the bundled GGUF, saved by transformers as a Hugging Face directory
    (save_pretrained: model.safetensors, fp32) and exported to ONNX with past (weights in external
    data): both compile to the tokens of transformers and of the GGUF file's own fp32 compile,
    32 steps on three prompts, logits within LOGIT_TOL of transformers'."""
    from deploy.compiler.decoder import compile_decoder
    from deploy.tools.examples import export_decoder_with_past
    from edge.generate.loader import load_decoder
    from tests.fixtures.hf_checkpoints import write_tokenizer
    from tests.fixtures.hf_reference import load_gguf_model, save_gguf_model

    quiet = lambda *a: None  # noqa: E731
    ref = load_gguf_model(smollm2_gguf)
    save_gguf_model(ref, tmp_path / "hf")
    export_decoder_with_past(ref, tmp_path / "onnx", external_data=True)
    for d in ("hf", "onnx"):
        write_tokenizer(tmp_path / d, smollm2_gguf, eos_ids=[2])
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == ["model.safetensors"]
    arts = {d: compile_decoder(tmp_path / d, "host", tmp_path / f"{d}.art", context=256, log=quiet) for d in ("hf", "onnx")}
    models = {"gguf": load_decoder(smollm2_fp32_artifact, context=256)} | {d: load_decoder(a, context=256) for d, a in arts.items()}
    for prompt in PROMPTS.values():
        want_toks, want_logits = greedy(ref, prompt, N_NEW)
        for name, m in models.items():
            toks, logits = greedy_decode(m.decoder, prompt, N_NEW)
            assert toks == want_toks, name
            err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
            assert err < LOGIT_TOL, f"{name}: logits differ by {err:.2e} of scale"
