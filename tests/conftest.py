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
