"""Real exporter graphs import with the sequence dim symbolic, compile with the real compiler, and
match ONNX Runtime on the same file; bad model files get a one-line error from the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge
from deploy.frontends.onnx import importer as onnx_import
from deploy.compiler.driver import compile_model
from edge.errors import ModelError

from tests.fixtures import onnx_patterns

LENGTHS = (1, 7, 64, 257)
BATCHES = (1, 2)
TOLERANCE = 1e-4  # max abs error relative to the output's scale, max(1, max|ref|)

# gpt2_onnx is the gpt2_external_onnx graph with weights inside: compiling both would only repeat.
FIXTURE_MODELS = ["bert_onnx", "bert_dynamo_onnx", "gpt2_external_onnx", "gpt2_dynamo_onnx"]
SESSION_ARTIFACTS = {"bert_onnx": "bert_artifact", "gpt2_external_onnx": "gpt2_artifact"}  # tests/conftest.py


def lm_inputs(names: list[str], batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids, an attention mask that pads the last row's second half, random token types."""
    rng = np.random.default_rng(seed + 1000 * batch + length)
    ids = rng.integers(1, onnx_patterns.VOCAB, (batch, length), dtype=np.int64)
    feed = {"input_ids": ids}
    if "attention_mask" in names:
        mask = np.ones_like(ids)
        if batch > 1:
            mask[-1, length // 2 + 1 :] = 0
        feed["attention_mask"] = mask
    if "token_type_ids" in names:
        feed["token_type_ids"] = (rng.random((batch, length)) < 0.3).astype(np.int64)
    return feed


def assert_matches(outputs, reference, context: str) -> None:
    assert len(outputs) == len(reference), context
    for i, (got, ref) in enumerate(zip(outputs, reference)):
        assert got.shape == ref.shape, f"{context} output {i}: shape {got.shape} != {ref.shape}"
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(got - ref).max()) / scale
        assert err <= TOLERANCE, f"{context} output {i}: relative error {err:.2e} > {TOLERANCE:.0e}"


def _compile(path: Path, out: Path) -> Path:
    return compile_model(path, "host", out, log=lambda *a: None)


# --- real exporter fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module", params=FIXTURE_MODELS)
def compiled_fixture(request, tmp_path_factory):
    """(fixture name, model path, edge.Runtime) — each fixture model compiled once per module."""
    path = request.getfixturevalue(request.param)
    if request.param in SESSION_ARTIFACTS:
        art = request.getfixturevalue(SESSION_ARTIFACTS[request.param])
    else:
        art = _compile(path, tmp_path_factory.mktemp("artifacts") / request.param)
    return request.param, path, edge.Runtime(art)


@pytest.mark.parametrize("batch", BATCHES)
def test_fixture_matches_onnxruntime(compiled_fixture, batch):
    name, path, runtime = compiled_fixture
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for length in LENGTHS:
        feed = lm_inputs(names, batch, length)
        assert_matches(runtime.run(feed), session.run(None, feed), f"{name} batch {batch} seq {length}")


def test_fixture_signature_keeps_seq_symbolic(compiled_fixture):
    name, path, runtime = compiled_fixture
    for spec in runtime.inputs:
        assert list(spec.shape) == ["batch", "seq"], (name, spec)
    for spec in runtime.outputs:
        assert list(spec.shape[:1]) == ["batch"], (name, spec)
        if spec.name != "pooler_output":
            assert spec.shape[1] == "seq", (name, spec)
    assert runtime.artifact.seq_dim == "seq"


def test_external_data_fixture_has_its_weights_outside(gpt2_external_onnx):
    data = Path(gpt2_external_onnx).with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > Path(gpt2_external_onnx).stat().st_size
    model = onnx.load(str(gpt2_external_onnx), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_fixture_graphs_use_the_exporter_patterns(bert_onnx, bert_dynamo_onnx, gpt2_onnx, gpt2_dynamo_onnx):
    """The fixtures are only worth something if they carry the chains we claim to handle."""
    ops = {}
    for p in (bert_onnx, bert_dynamo_onnx, gpt2_onnx, gpt2_dynamo_onnx):
        ops[Path(p).parent.name] = {n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node}
    for name, found in ops.items():
        assert {"Shape", "Gather", "Concat", "Reshape"} <= found, name
    assert "ConstantOfShape" in ops["bert"] and "Expand" in ops["bert"]
    assert "Range" in ops["gpt2"] and "Where" in ops["gpt2"]
    assert "Range" in ops["bert_dynamo"] and "Where" in ops["gpt2_dynamo"]


def test_stock_frontend_still_needs_our_converters(bert_onnx):
    """If a TVM upgrade fixes the stock converters, deploy/frontends/onnx/converters.py can shrink."""
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx_import.load(bert_onnx)
    with onnx_import._quiet(), pytest.raises(Exception, match="broadcast_to"):
        from_onnx(model, keep_params_in_input=True)


# --- hand-built graphs, one exporter chain each ------------------------------------------------


@pytest.fixture(scope="module", params=sorted(onnx_patterns.PATTERNS))
def compiled_pattern(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    path = d / "model.onnx"
    onnx.save(onnx_patterns.PATTERNS[request.param](), str(path))
    return request.param, path, edge.Runtime(_compile(path, d / "artifact"))


def test_pattern_matches_onnxruntime(compiled_pattern):
    name, path, runtime = compiled_pattern
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in BATCHES:
        for length in LENGTHS:
            feed = lm_inputs(["input_ids"], batch, length)
            assert_matches(runtime.run(feed), session.run(None, feed), f"{name} batch {batch} seq {length}")


@pytest.mark.parametrize("name", sorted(onnx_patterns.PATTERNS))
def test_pattern_output_shape_stays_symbolic(name):
    mod, _ = onnx_import.to_relax(onnx_import.load_model(onnx_patterns.PATTERNS[name]()))
    ret = mod["main"].ret_ty
    assert ret.shape is not None, f"{name}: output shape lost"
    assert "seq" in str(ret.shape), f"{name}: {ret}"


def test_unify_sequence_dims_names_inconsistent_dims():
    model = onnx_patterns.range_positions()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "input_ids_dynamic_axes_1"
    extra = onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["b", None])
    model.graph.input.append(extra)
    onnx_import.load_model(model)
    for i in model.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "seq"]


def test_list_dynamic_axes_export_gets_shared_dim_names(tmp_path):
    """torch.onnx with `dynamic_axes` given as lists names every input's dims differently."""
    torch = pytest.importorskip("torch")
    from deploy.tools import examples
    from tests.fixtures import models

    module = examples.bert_module(examples.bert_model(models.TINY_BERT))
    ids = torch.randint(1, 100, (2, 8))
    path = tmp_path / "list_axes.onnx"
    examples.quiet_export(lambda: torch.onnx.export(
        module, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
        input_names=examples.BERT_INPUTS, output_names=examples.BERT_OUTPUTS,
        dynamic_axes={n: [0, 1] for n in examples.BERT_INPUTS}, opset_version=17, dynamo=False))
    raw = onnx.load(str(path))
    assert len({i.type.tensor_type.shape.dim[1].dim_param for i in raw.graph.input}) == 3
    mod, _ = onnx_import.to_relax(onnx_import.load(path))
    assert str(mod["main"].ret_ty.fields[0].shape[1]) == "seq"


# --- bad model files --------------------------------------------------------------------------


def _cli_compile(model: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "compile", str(model), "-t", "host", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgejit compile: error:"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()


def _bad_models(tmp: Path, gpt2_external: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    not_onnx = tmp / "notes.onnx"
    not_onnx.write_text("this is a text file, not a protobuf\n" * 20)
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(Path(gpt2_external).read_bytes()[:-1000])
    missing = tmp / "missing" / "model.onnx"
    missing.parent.mkdir()
    shutil.copy(gpt2_external, missing)  # without model.onnx.data
    short = tmp / "short" / "model.onnx"
    short.parent.mkdir()
    shutil.copy(gpt2_external, short)
    data = Path(gpt2_external).with_name("model.onnx.data").read_bytes()
    short.with_name("model.onnx.data").write_bytes(data[: len(data) // 2])
    unsupported = tmp / "unsupported.onnx"
    onnx.save(onnx_patterns.unsupported_op(), str(unsupported))
    return {
        "not_onnx": (not_onnx, ("not an ONNX model",)),
        "truncated": (truncated, ("truncated",)),
        "missing_external_data": (missing, ("missing external data file", "model.onnx.data")),
        "short_external_data": (short, ("bad external data",)),
        "unsupported_op": (unsupported, ("unsupported operator Celu", "/encoder/act/Celu")),
    }


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "missing_external_data", "short_external_data", "unsupported_op"])
def test_bad_model_is_one_line_error_in_process(case, tmp_path, gpt2_external_onnx):
    path, needles = _bad_models(tmp_path, Path(gpt2_external_onnx))[case]
    with pytest.raises(ModelError) as e:
        onnx_import.to_relax(onnx_import.load(path))
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.slow
def test_bad_models_cli(tmp_path, gpt2_external_onnx):
    """Through the real command, one process per file (~5 s each: TVM import)."""
    for case, (path, needles) in _bad_models(tmp_path, Path(gpt2_external_onnx)).items():
        out = tmp_path / f"art_{case}"
        _assert_one_line_error(_cli_compile(path, out), out, *needles)
