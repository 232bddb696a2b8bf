"""int8: kernels against integer references, the Relax rewrite end to end through `compile`,
calibration and accuracy checks, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.quantize.int8 import accuracy, calibrate, scheme as quantize
from deploy.compiler.driver import compile_model
from edge import machine
from edge.artifact.reader import TensorSpec
from edge.kernels import int8
from tests.deploy.int8_models import transformer

X86_TARGETS = {
    "vnni512": ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake",
                 "mattr": ["+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni"]}, ["avx512f", "avx512bw", "avx512_vnni"]),
    "avxvnni": ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake", "mattr": ["+avx2", "+fma", "+avxvnni"]},
                ["avx2", "avx_vnni"]),
    "avx2": ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "mattr": ["+avx2", "+fma"]}, ["avx2"]),
    "generic": ({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, []),
}
ARM_TARGETS = {
    "dotprod": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}, "sdot"),
    "neon": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}, "smull"),
}


def _runnable(isa):
    target, needs = X86_TARGETS[isa]
    return machine.arch() == "x86_64" and not machine.missing_features(needs)


def _compile_kernels(k, n, isa, target):
    import tvm

    funcs = {
        "qr": int8.quantize_rows(k, isa).with_attr("global_symbol", "qr"),
        "qd": int8.qdense(k, n, isa).with_attr("global_symbol", "qd"),
    }
    return tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(target))


@pytest.mark.parametrize("isa", list(X86_TARGETS))
def test_kernels_match_integer_reference(isa):
    import tvm

    if not _runnable(isa):
        pytest.skip(f"{isa} does not run on this machine")
    target, _ = X86_TARGETS[isa]
    assert int8.isa_of(target) == isa
    k, n = 64, 96
    lib = _compile_kernels(k, n, isa, target)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wq, ws = int8.quantize_weight(w)
    assert wq.min() >= -127 and wq.max() <= 127
    wp, wc = int8.pack_weight(wq, isa)
    for m in (1, 5, 8, 13):  # row tails of the 4-row tile, one compiled kernel (symbolic rows)
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        x[0] = 0  # an all-zero row must not divide by zero
        q = tvm.runtime.tensor(np.zeros((m, k), int8.activation_dtype(isa)))
        xs = tvm.runtime.tensor(np.zeros(m, np.float32))
        lib["qr"](tvm.runtime.tensor(x), q, xs)
        qi = q.numpy().astype(np.int64) - (128 if int8.activation_dtype(isa) == "uint8" else 0)
        amax = np.abs(x).max(1)
        np.testing.assert_allclose(xs.numpy(), np.where(amax > 0, amax / 127, 1), rtol=1e-6)
        assert np.abs(qi).max() <= 127
        assert np.abs(qi - x / xs.numpy()[:, None]).max() <= 0.5 + 1e-3
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        lib["qd"](q, xs, *[tvm.runtime.tensor(a) for a in (wp, wc, ws, bias)], y)
        # Exact int32 accumulation: the only rounding is in the fp32 epilogue.
        ref = (qi @ wq.astype(np.int64)) * xs.numpy()[:, None].astype(np.float64) * ws + bias
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-4)
        # and close to the float product
        assert np.abs(y.numpy() - (x @ w + bias)).max() < 0.05 * np.abs(x @ w).max() + 1e-3


def test_avx2_kernel_does_not_saturate():
    """|a| = |w| = 127 everywhere: vpmaddubsw pairs reach 32258, still exact."""
    import tvm

    if not _runnable("avx2"):
        pytest.skip("avx2 does not run on this machine")
    k, n = 32, 16
    lib = _compile_kernels(k, n, "avx2", X86_TARGETS["avx2"][0])
    wq = np.full((k, n), -127, np.int8)
    wq[:, ::2] = 127
    wp, wc = int8.pack_weight(wq, "avx2")
    q = tvm.runtime.tensor(np.full((3, k), 127, np.int8))
    y = tvm.runtime.tensor(np.zeros((3, n), np.float32))
    args = [q, tvm.runtime.tensor(np.ones(3, np.float32))] + [tvm.runtime.tensor(a) for a in (wp, wc, np.ones(n, np.float32), np.zeros(n, np.float32))]
    lib["qd"](*args, y)
    assert (y.numpy()[:, ::2] == 127 * 127 * k).all() and (y.numpy()[:, 1::2] == -127 * 127 * k).all()


@pytest.mark.parametrize("isa", list(ARM_TARGETS))
def test_arm_kernels_cross_compile_to_dot_instructions(isa):
    target, instr = ARM_TARGETS[isa]
    assert int8.isa_of(target) == isa
    lib = _compile_kernels(64, 48, isa, target)
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    assert instr in asm


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return transformer(tmp_path_factory.mktemp("int8") / "encoder.onnx", layers=2)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return transformer(tmp_path_factory.mktemp("int8") / "decoder.onnx", layers=1, lm_head=True)


def _spec_reference(path, feeds):
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(str(path))).run(None, feeds)[0]


def test_int8_encoder_compiles_runs_and_reports(encoder, tmp_path):
    from edge.runtime.runtime import Runtime

    logs = []
    out = compile_model(encoder, "host", tmp_path / "a", precision="int8", log=logs.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    q = manifest["quantization"]
    assert q["quantized"] == 12 and q["activations"] == "dynamic"  # 2 layers x (q, k, v, out, ffn1, ffn2)
    assert q["fused_gelu"] == 2  # the erf GELU after each ffn1 runs in the kernel epilogue
    acc = manifest["accuracy"]
    assert acc["kind"] == "encoder" and acc["metric"] == "cosine_mean" and acc["value"] >= 0.999
    assert set(acc["pooled"]) == {"max_abs_err", "mean_abs_err", "cosine_mean", "cosine_min"}
    with np.load(out / "params.npz") as z:
        assert sum(z[f].dtype == np.int8 for f in z.files) == 12  # weights stored as int8 panels
    assert "edgejit_qdense" in (out / "module.json").read_text()

    rt = Runtime(out)
    rng = np.random.default_rng(3)
    for seq in (1, 7, 37):
        feeds = {"input_ids": rng.integers(0, 96, (2, seq)), "attention_mask": np.ones((2, seq), np.int64)}
        got = rt.run(feeds)[0]
        ref = _spec_reference(encoder, feeds)
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.999, (seq, cos.min())


def test_int8_module_specializes_to_static_length(encoder, tmp_path):
    """The saved module is what the device JIT binds to a static length: same results."""
    import tvm
    from tvm import relax

    from deploy.frontends.onnx import importer as onnx_import
    from deploy.compiler import prepare as optimize
    from edge.runtime import pipeline as edge_build
    from edge.artifact.targets import get_preset

    preset = get_preset("host")
    mod, params = onnx_import.to_relax(onnx_import.load(encoder))
    mod, params = optimize.prepare(mod, params, preset.tvm_target(), precision="int8", quant=quantize.QuantOptions())
    mod = tvm.ir.load_json(tvm.ir.save_json(mod))  # as the device reads module.json
    feeds = [np.random.default_rng(4).integers(0, 96, (1, 16)), np.ones((1, 16), np.int64)]
    outs = []
    for bind in (None, {"seq": 16}):
        ex = edge_build.build(mod, preset.target, bind=bind)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in feeds], *[tvm.runtime.tensor(p) for p in params]).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_int8_decoder_static_calibration_keeps_head_float(decoder, tmp_path):
    rng = np.random.default_rng(5)
    cal = tmp_path / "cal.npz"
    np.savez(cal, input_ids=rng.integers(0, 96, (4, 24)), attention_mask=np.ones((4, 24), np.int64))
    # the avx2 kernels run on every x86 CI machine
    target = "x86-64-avx2" if machine.arch() == "x86_64" else "host"
    out = compile_model(decoder, target, tmp_path / "d", precision="int8", calibrate=cal, activations="static", log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["activations"] == "static" and q["quantized"] == 6
    assert [f["reason"] for f in q["float"]] == ["head (--keep-float head)"]
    acc = manifest["accuracy"]
    assert acc["kind"] == "decoder" and acc["metric"] == "top1_agreement" and acc["samples"] == 4
    assert acc["value"] >= 0.75 and acc["next_token_logits"]["cosine_mean"] > 0.99


def test_accuracy_below_threshold_refuses_to_write(encoder, tmp_path):
    with pytest.raises(accuracy.AccuracyError, match=r"cosine_mean 0\.\d+ < 1\.0+ \(short by 0\.0"):
        compile_model(encoder, "host", tmp_path / "a", precision="int8", min_accuracy=1.0, log=lambda *_: None)
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    out = compile_model(encoder, "host", tmp_path / "b", precision="int8", min_accuracy=1.0, accept_accuracy=True,
                        keep_float=["head", "encoder.layer.1.*"], log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accuracy"]["below_threshold"] is True and manifest["accuracy"]["threshold"] == 1.0
    assert manifest["quantization"]["quantized"] == 6  # layer 1 kept in float by pattern


def test_no_quantizable_matmul_keeps_fp32(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32), "emb")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("Softmax", ["h"], ["out"], axis=-1)],
        "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 16])], [emb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    logs = []
    out = compile_model(tmp_path / "m.onnx", "host", tmp_path / "a", precision="int8", log=logs.append)
    assert any("no quantizable matmul" in line and "keeping fp32" in line for line in logs)
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"


SPECS = [TensorSpec("input_ids", "int64", ("batch", "seq"), (0, 95)), TensorSpec("attention_mask", "int64", ("batch", "seq"))]


@pytest.mark.parametrize("arrays, message", [
    ({"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int64)}, "'input_ids' is int32, the model takes int64"),
    ({"input_ids": np.zeros((2, 4), np.int64)}, "missing input 'attention_mask'"),
    ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64), "x": np.ones(2)}, "unknown input 'x'"),
    ({"input_ids": np.zeros((2, 4, 1), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "has 3 dims"),
    ({"input_ids": np.zeros((0, 4), np.int64), "attention_mask": np.ones((0, 4), np.int64)}, "calibration data is empty"),
    ({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": np.ones((3, 4), np.int64)}, "disagree on the number of samples"),
    ({"input_ids": np.full((2, 4), 500, np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "outside \\[0, 95\\]"),
])
def test_bad_calibration_data_is_a_one_line_error(tmp_path, arrays, message):
    path = tmp_path / "cal.npz"
    np.savez(path, **arrays)
    with pytest.raises(calibrate.CalibrationError, match=message) as e:
        calibrate.load_samples(path, SPECS)
    assert "\n" not in str(e.value)


def test_calibration_file_kinds(tmp_path):
    with pytest.raises(calibrate.CalibrationError, match="use .npz"):
        (tmp_path / "c.csv").write_text("1,2")
        calibrate.load_samples(tmp_path / "c.csv", SPECS)
    (tmp_path / "c.txt").write_text("\n\n")
    with pytest.raises(calibrate.CalibrationError, match="is empty"):
        calibrate.load_samples(tmp_path / "c.txt", SPECS)
    np.savez(tmp_path / "ok.npz", input_ids=np.ones((3, 5), np.int64), attention_mask=np.ones((3, 5), np.int64))
    samples = calibrate.load_samples(tmp_path / "ok.npz", SPECS)
    assert len(samples) == 3 and samples[0]["input_ids"].shape == (1, 5)


def test_bad_options(encoder, tmp_path):
    with pytest.raises(quantize.QuantizeError, match="--keep-float entry 'nope'"):
        compile_model(encoder, "host", tmp_path / "a", precision="int8", keep_float=["nope"], log=lambda *_: None)
    with pytest.raises(quantize.QuantizeError, match="--min-accuracy 99.0 is not between 0 and 1"):
        compile_model(encoder, "host", tmp_path / "a", precision="int8", min_accuracy=99.0, log=lambda *_: None)
    with pytest.raises(quantize.QuantizeError, match="--activations static needs calibration data"):
        compile_model(encoder, "host", tmp_path / "a", precision="int8", activations="static", log=lambda *_: None)
    assert not (tmp_path / "a").exists()


def test_prequantized_models_lower_to_the_int8_kernels(encoder, tmp_path):
    """ORT quantize_dynamic (MatMulInteger) and QDQ models: same kernels, the model's own int8 weights."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from edge.runtime.runtime import Runtime

    rng = np.random.default_rng(6)
    dyn, qdq = tmp_path / "dyn.onnx", tmp_path / "qdq.onnx"
    quantize_dynamic(str(encoder), str(dyn), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_ids": rng.integers(0, 96, (1, 16)), "attention_mask": np.ones((1, 16), np.int64)} for _ in range(3)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(encoder), str(qdq), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    for path, kind in ((dyn, "matmul_integer"), (qdq, "dequantized_weights")):
        out = compile_model(path, "host", tmp_path / path.stem, precision="int8", log=lambda *_: None)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["quantization"]["prequantized"][kind] == 12 and manifest["quantization"]["quantized"] == 12
        assert manifest["accuracy"]["value"] > 0.999
        # the artifact's int8 panels are the model's own int8 weights
        model = onnx.load(str(path))
        own = {onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
        with np.load(out / "params.npz") as z:
            panels = [z[f] for f in z.files if z[f].dtype == np.int8]
        unpacked = {p.transpose(1, 3, 0, 2).reshape(p.shape[1] * 4, p.shape[0] * 16).tobytes() for p in panels}
        assert own and own <= unpacked
        feeds = {"input_ids": rng.integers(0, 96, (1, 21)), "attention_mask": np.ones((1, 21), np.int64)}
        got = Runtime(out).run(feeds)[0]
        ref = ort.InferenceSession(str(encoder)).run(None, feeds)[0]
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.999


def test_int8_for_arm_cross_compiles_and_reports_through_host_build(decoder, tmp_path):
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 linker (Debian package gcc-aarch64-linux-gnu)")
    out = compile_model(decoder, "rpi5", tmp_path / "arm", precision="int8", log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["isa"] == "dotprod" and manifest["target"]["arch"] == "aarch64"
    assert manifest["accuracy"]["measured_on"] == "host build of the same rewrite"
    assert manifest["accuracy"]["value"] >= 0.75
    assert (out / "generic.so").read_bytes()[:4] == b"\x7fELF"


def test_text_calibration_uses_the_tokenizer_next_to_the_model(encoder, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(encoder.read_bytes())
    tok.save(str(model.parent / "tokenizer.json"))
    (tmp_path / "cal.txt").write_text("w1 w2 w3 w4 hello\n\nw5 w6 w7\n")
    specs = SPECS
    samples = calibrate.load_samples(tmp_path / "cal.txt", specs, model_path=model)
    assert [s["input_ids"].tolist() for s in samples] == [[[1, 2, 3, 4, 95]], [[5, 6, 7]]]
    assert samples[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 1]] and samples[0]["input_ids"].dtype == np.int64
    with pytest.raises(calibrate.CalibrationError, match="needs a tokenizer.json next to the model"):
        calibrate.load_samples(tmp_path / "cal.txt", specs, model_path=tmp_path / "elsewhere" / "model.onnx")


@pytest.mark.parametrize("epilogue", ["gelu", "gelu_tanh"])
def test_fused_gelu_epilogues(epilogue):
    import math

    import tvm

    isa = next((i for i in ("vnni512", "avx2") if _runnable(i)), "generic")
    target = X86_TARGETS[isa][0] if machine.arch() == "x86_64" else {"kind": "llvm"}
    k, n, m = 32, 16, 3
    lib = tvm.compile(tvm.IRModule({"qd": int8.qdense(k, n, isa, epilogue).with_attr("global_symbol", "qd")}),
                      target=tvm.target.Target(target))
    rng = np.random.default_rng(7)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    wp, wc = int8.pack_weight(wq, isa)
    qi = rng.integers(-127, 128, (m, k))
    q = (qi + (128 if int8.activation_dtype(isa) == "uint8" else 0)).astype(int8.activation_dtype(isa))
    xs, ws, b = np.full(m, 2e-4, np.float32), np.ones(n, np.float32), rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["qd"](*[tvm.runtime.tensor(a) for a in (q, xs, wp, wc, ws, b)], y)
    v = (qi @ wq.astype(np.int64)) * 2e-4 + b
    if epilogue == "gelu":
        ref = v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
    else:
        ref = v * 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    np.testing.assert_allclose(y.numpy(), ref, atol=2e-5 * max(1, np.abs(v).max()))


@pytest.mark.parametrize("fixture, gelus, head", [("bert_onnx", 2, "m.pooler.dense.weight"), ("gpt2_onnx", 2, None)])
def test_int8_on_real_exporter_graphs(request, tmp_path, fixture, gelus, head):
    """torch.onnx TorchScript exports (shape arithmetic, Gemm-free HF layers, erf and tanh GELUs)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from edge.runtime.runtime import Runtime

    path = request.getfixturevalue(fixture)
    out = compile_model(path, "host", tmp_path / fixture, precision="int8", log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["quantized"] == 8 + 4 * (fixture == "bert_onnx") and q["fused_gelu"] == gelus
    assert [f["weight"] for f in q["float"]] == ([head] if head else [q["float"][0]["weight"]])  # pooler / LM head
    assert manifest["accuracy"]["kind"] == ("encoder" if fixture == "bert_onnx" else "decoder")
    rt = Runtime(out)
    names = [s.name for s in rt.inputs]
    ids = np.random.default_rng(8).integers(0, 127, (1, 23))
    feeds = {n: ids if n == "input_ids" else (np.ones_like(ids) if "mask" in n else np.zeros_like(ids)) for n in names}
    got = rt.run(feeds)[0]
    ref = ReferenceEvaluator(onnx.load(str(path))).run(None, feeds)[0]
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.999
    if fixture == "gpt2_onnx":
        assert (got[0].argmax(-1) == ref[0].argmax(-1)).mean() > 0.9
