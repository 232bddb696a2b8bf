"""The isolated compile worker: real worker processes compile real variants; a worker that is
SIGKILLed mid-compile, hangs past its deadline or runs out of memory is contained and reported,
while a runtime in this process keeps serving correct results."""

from __future__ import annotations

import contextlib
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edge
from edge.artifact.reader import Artifact
from edge.jit.worker import TEST_FAULT_ENV, compile_in_worker
from edge.runtime.module import CompiledModule
from tests.fixtures import handmade

SEQ = 12


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    rt = edge.Runtime(tiny_artifact, threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def serving(runtime, reference):
    """Serve requests from a thread while the block runs; yields a dict with the count served."""
    x = handmade.inputs(1, 7, seed=3)
    want = reference.run(None, x)
    stats = {"served": 0, "errors": []}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                for got, w in zip(runtime.run(x), want):
                    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
                stats["served"] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                stats["errors"].append(e)
            stop.wait(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield stats
    finally:
        stop.set()
        t.join(10)
    assert not stats["errors"], stats["errors"][0]
    assert stats["served"] > 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _only(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir())


def test_worker_builds_a_variant_that_matches(tiny_artifact, runtime, reference, tmp_path):
    out = tmp_path / "variant.so"
    result = compile_in_worker(Artifact.open(tiny_artifact), {"seq": SEQ}, out, timeout_s=120, memory_mb=4096)
    assert result.ok, result.error
    assert result.killed_by is None and result.duration_s > 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert _only(tmp_path) == ["variant.so"]  # the worker's scratch directory is gone

    variant = CompiledModule.load(out, runtime._params, kind="variant", bind={"seq": SEQ}, threads=1)
    x = handmade.inputs(2, SEQ, seed=1)
    x["attention_mask"][1, 9:] = 0
    generic = runtime.generic([x["input_ids"], x["attention_mask"]])
    got = variant([x["input_ids"], x["attention_mask"]])
    for g, v, r in zip(generic, got, reference.run(None, x)):
        np.testing.assert_allclose(v, r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, g, rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception):  # static shapes: the variant takes only its own length
        variant([x["input_ids"][:, :5], x["attention_mask"][:, :5]])


def test_sigkill_mid_compile_is_contained(tiny_artifact, runtime, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_FAULT_ENV, "sigkill")
    out = tmp_path / "variant.so"
    with serving(runtime, reference):
        result = compile_in_worker(tiny_artifact, {"seq": SEQ}, out, timeout_s=120, memory_mb=4096)
    assert not result.ok and result.killed_by == "signal 9"
    assert result.reason == "compile worker died from signal 9 (SIGKILL)"
    assert "test fault: SIGKILL before pass" in result.error  # it died inside the compiler
    assert _only(tmp_path) == []


def test_timeout_kills_the_worker_and_its_children(tiny_artifact, runtime, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_FAULT_ENV, "hang")
    out = tmp_path / "variant.so"
    with serving(runtime, reference) as stats:
        result = compile_in_worker(tiny_artifact, {"seq": SEQ}, out, timeout_s=5, memory_mb=4096)
    assert not result.ok and result.killed_by == "timeout"
    assert result.reason == "compile timed out after 5 s; worker killed"
    assert 5 <= result.duration_s < 15
    assert stats["served"] >= 3  # serving went on during the hang
    child = int(result.error.split("child pid ")[1].split()[0])
    assert not _alive(child)  # the whole process group was killed, not just the worker
    assert _only(tmp_path) == []


def test_out_of_memory_is_reported(tiny_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_FAULT_ENV, "oom")
    result = compile_in_worker(tiny_artifact, {"seq": SEQ}, tmp_path / "v.so", timeout_s=60, memory_mb=2048)
    assert not result.ok and result.killed_by == "memory"
    assert result.reason == "compile worker ran out of memory (limit 2048 MB)"


def test_compile_error_is_reported_not_raised(tiny_artifact, tmp_path):
    art_dir = tmp_path / "art"
    shutil.copytree(tiny_artifact, art_dir)
    art = Artifact.open(art_dir)
    (art_dir / "module.json").write_text("{}")  # changed after the artifact was verified
    (tmp_path / "out").mkdir()
    result = compile_in_worker(art, {"seq": SEQ}, tmp_path / "out" / "v.so", timeout_s=60, memory_mb=4096)
    assert not result.ok and result.killed_by is None and result.returncode == 1
    assert result.reason.startswith("compile failed: RuntimeError: ")
    assert "does not match the manifest's checksum" in result.reason
    assert _only(tmp_path / "out") == []
