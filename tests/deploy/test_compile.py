"""The compile command: host and aarch64 artifacts, the CLI's one-line errors, atomic output."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from deploy.compiler.driver import compile_model
from tests.fixtures import handmade

EM_AARCH64, EM_X86_64 = 183, 62


def edgejit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def elf_machine(path) -> int:
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


@pytest.mark.parametrize("preset", ["aarch64", "rpi5"])
def test_aarch64_artifact_is_an_aarch64_elf(tiny_onnx, tmp_path, preset):
    art = compile_model(tiny_onnx, preset, tmp_path / preset, log=lambda *a: None)
    assert elf_machine(art / "generic.so") == EM_AARCH64
    m = json.loads((art / "manifest.json").read_text())
    assert m["target"]["preset"] == preset and m["target"]["arch"] == "aarch64"
    assert m["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"


def test_host_artifact_is_native(tiny_artifact):
    assert elf_machine(tiny_artifact / "generic.so") == EM_X86_64


def test_cli_compile_and_run_match_reference(tiny_onnx, tmp_path):
    art = tmp_path / "art"
    r = edgejit("compile", tiny_onnx, "--target", "host", "-o", art)
    assert r.returncode == 0, r.stderr
    r = edgejit("run", art, "--input", "input_ids=[[1,2,3,4,5]]", "--save", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "hidden: shape [1, 5, 32] float32" in r.stdout
    x = {"input_ids": np.array([[1, 2, 3, 4, 5]]), "attention_mask": np.ones((1, 5), dtype=np.int64)}
    want = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, x)
    got = np.load(tmp_path / "out" / "pooled.npy")
    assert np.abs(got - want[1]).max() < 1e-4


def test_targets_lists_the_presets():
    r = edgejit("targets")
    assert r.returncode == 0
    for name in ["x86-64-avx2", "x86-64-avxvnni", "x86-64-avx512", "x86-64-avx512-vbmi", "aarch64", "rpi4", "rpi5", "jetson-orin"]:
        assert name in r.stdout


def _one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]  # warnings may precede it
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


def test_unknown_preset(tiny_onnx, tmp_path):
    _one_line_error(edgejit("compile", tiny_onnx, "-t", "pdp11", "-o", tmp_path / "a"), "unknown target preset 'pdp11'", "rpi5")


def test_missing_aarch64_linker(tiny_onnx, tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no cross linker on this PATH
    _one_line_error(edgejit("compile", tiny_onnx, "-t", "rpi4", "-o", tmp_path / "a", env=env), "gcc-aarch64-linux-gnu")
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_force(tiny_onnx, tmp_path):
    (tmp_path / "a").mkdir()
    _one_line_error(edgejit("compile", tiny_onnx, "-o", tmp_path / "a"), "exists", "--force")


def test_run_errors_are_one_line(tiny_artifact, tmp_path):
    _one_line_error(edgejit("run", tiny_artifact, "--input", "input_ids=[[1,2,999]]"), "outside [0, 63]")
    _one_line_error(edgejit("run", tiny_artifact, "--input", "tokens=[[1]]"), "unknown input 'tokens'")
    _one_line_error(edgejit("run", tmp_path, "--input", "input_ids=[[1]]"), "no manifest.json")


def test_failed_compile_leaves_nothing(tiny_onnx, tmp_path, monkeypatch):
    from edge.runtime import pipeline as build

    def boom(*a, **k):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(build, "export", boom)
    with pytest.raises(RuntimeError):
        compile_model(tiny_onnx, "host", tmp_path / "out", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its temp dir


def test_padding_safety_is_checked_on_the_model(tmp_path):
    safe = compile_model(handmade.encoder(tmp_path / "safe.onnx"), "host", tmp_path / "s", log=lambda *a: None)
    unsafe = compile_model(handmade.encoder(tmp_path / "unsafe.onnx", masked_pooling=False), "host", tmp_path / "u", log=lambda *a: None)
    assert json.loads((safe / "manifest.json").read_text())["padding"]["safe"] is True
    p = json.loads((unsafe / "manifest.json").read_text())["padding"]
    assert p["safe"] is False and "changes the outputs" in p["why"]


def test_max_seq_follows_the_position_table(bert_onnx, tmp_path):
    from edge.errors import EdgeJitError

    with pytest.raises(EdgeJitError, match="--max-seq 1024 is longer than the model's 512 position embeddings"):
        compile_model(bert_onnx, "host", tmp_path / "a", max_seq=1024, log=lambda *a: None)
    assert not (tmp_path / "a").exists()
