"""Session-wide fixtures: tiny real-exporter ONNX models (tests/fixtures/models.py), generated
once per test session into a temporary directory. Each returns the path of the .onnx file."""

from __future__ import annotations

import pytest

from tests.fixtures import models


@pytest.fixture(scope="session")
def fixture_models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_models")


def _model_fixture(name: str):
    @pytest.fixture(scope="session", name=name)
    def _fixture(fixture_models_dir):
        return models.generate(name, fixture_models_dir)

    _fixture.__doc__ = f"Path of the {name} fixture model (see tests/fixtures/models.py)."
    return _fixture


bert_onnx = _model_fixture("bert_onnx")  # TorchScript exporter, BERT encoder
bert_dynamo_onnx = _model_fixture("bert_dynamo_onnx")  # dynamo exporter, BERT encoder
wide_bert_onnx = _model_fixture("wide_bert_onnx")  # TorchScript exporter, BERT at hidden 384, 1 layer
gpt2_onnx = _model_fixture("gpt2_onnx")  # TorchScript exporter, GPT-2 causal decoder
gpt2_dynamo_onnx = _model_fixture("gpt2_dynamo_onnx")  # dynamo exporter, GPT-2 causal decoder
gpt2_external_onnx = _model_fixture("gpt2_external_onnx")  # as gpt2_onnx, weights in model.onnx.data


# -- hand-built tiny models for the artifact/runtime/JIT machinery (fast to compile) --------------
@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    from tests.fixtures import handmade

    return handmade.encoder(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_onnx, tmp_path_factory):
    """The tiny encoder compiled for this machine (shared: tests must not modify it)."""
    from deploy.compiler.driver import compile_model

    return compile_model(tiny_onnx, "host", tmp_path_factory.mktemp("tiny_art") / "tiny", max_seq=128, log=lambda *a: None)


def _host_artifact(model_fixture: str, name: str):
    @pytest.fixture(scope="session", name=name)
    def _fixture(request, tmp_path_factory):
        from deploy.compiler.driver import compile_model

        model = request.getfixturevalue(model_fixture)
        return compile_model(model, "host", tmp_path_factory.mktemp("artifacts") / name, log=lambda *a: None)

    _fixture.__doc__ = (f"Path of a host (fp32) artifact compiled once per session from {model_fixture}. "
                        "Shared: don't modify it (copy it first to tamper with files).")
    return _fixture


bert_artifact = _host_artifact("bert_onnx", "bert_artifact")
gpt2_artifact = _host_artifact("gpt2_external_onnx", "gpt2_artifact")


# -- text generation: the bundled SmolLM2 and tiny random-weight Llama GGUF files ------------------
@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """The bundled chat model, SmolLM2-135M-Instruct Q4_1 (written by `edgejit example --model smollm2`)."""
    from deploy.tools.examples import write_smollm2

    return write_smollm2(tmp_path_factory.mktemp("smollm2"), log=lambda *a: None)


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf, tmp_path_factory):
    """SmolLM2 compiled for this machine once per session (shared: tests must not modify it)."""
    from deploy.compiler.decoder import compile_decoder

    return compile_decoder(smollm2_gguf, "host", tmp_path_factory.mktemp("smollm2_art") / "smollm2", context=1024, log=lambda *a: None)


@pytest.fixture(scope="session")
def smollm2_int8_artifact(smollm2_gguf, tmp_path_factory):
    """SmolLM2 compiled as `edgejit compile` does: the batch-1 decode step in the artifact, int8
    activations in the 4/8-bit matrix products where the host has AVX-512 VNNI, an fp16 KV cache."""
    from deploy.compiler.decoder import compile_decoder

    return compile_decoder(smollm2_gguf, "host", tmp_path_factory.mktemp("smollm2_int8") / "smollm2", context=512,
                           decode_variants=(1,), matmul_activations="int8", kv_cache="fp16", log=lambda *a: None)


@pytest.fixture(scope="session")
def smollm2_fp32_artifact(smollm2_gguf, tmp_path_factory):
    """SmolLM2 compiled with --precision fp32 (every weight dequantized on the host)."""
    from deploy.compiler.decoder import compile_decoder

    return compile_decoder(smollm2_gguf, "host", tmp_path_factory.mktemp("smollm2_fp32") / "smollm2", context=512,
                           precision="fp32", log=lambda *a: None)


# name -> write_llama_gguf options: GQA with a tied head; an untied head (MHA); llama3 RoPE scaling
TINY_LLAMAS = {
    "gqa_tied": dict(seed=1),
    "untied_mha": dict(seed=2, heads=4, kv_heads=4, tied=False, rope_theta=500000.0),
    "llama3_scaling": dict(seed=3, llama3_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=64)),
    # weights kept quantized by the compile (weight-only kernels), as GGUF files hold them
    "q4_1_gqa": dict(seed=4, weight_type="Q4_1", embed_type="Q8_0"),
    "q4_0_untied": dict(seed=5, weight_type="Q4_0", tied=False),
    "q8_0_gqa": dict(seed=6, weight_type="Q8_0"),
    "f16_gqa": dict(seed=7, weight_type="F16"),  # kept fp16, widened in the dense kernel
}


@pytest.fixture(scope="session")
def tiny_llamas(smollm2_gguf, tmp_path_factory):
    """{name: (fixture dict from write_llama_gguf, host artifact path)}: each compiled once."""
    from deploy.compiler.decoder import compile_decoder
    from tests.fixtures.gguf_llama import write_llama_gguf

    root = tmp_path_factory.mktemp("tiny_llama")
    out = {}
    for name, opts in TINY_LLAMAS.items():
        fx = write_llama_gguf(root / f"{name}.gguf", smollm2_gguf, **opts)
        out[name] = (fx, compile_decoder(fx["path"], "host", root / name, log=lambda *a: None))
    return out
