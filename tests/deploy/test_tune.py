"""`edgejit compile --tune`: MetaSchedule records per length, stored with the artifact, applied by
the host's check and the device's JIT variants, never across targets; interrupt and resume."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

import edge
from edge.artifact.reader import sha256_file
from edge.errors import ArtifactError, EdgeJitError
from edge.jit.policy import JitPolicy
from edge.artifact.targets import get_preset
from edge.runtime.tuning_records import TuningRecords

pytestmark = pytest.mark.slow

TRIALS, LENGTH = 16, 32


def edgejit_proc(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "edge.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _records_measured(tune_dir) -> int:
    return sum(len(p.read_text().splitlines()) for p in tune_dir.glob("*/database_tuning_record.json"))


@pytest.fixture(scope="module")
def tuned(wide_bert_onnx, tmp_path_factory):
    """Compile with --tune through the CLI, interrupt it (SIGINT) once some candidates are measured,
    then run the same command again. Returns both runs and the artifact."""
    root = tmp_path_factory.mktemp("tune")
    art, tune_dir = root / "art", root / "search"
    cmd = ("compile", wide_bert_onnx, "-o", art, "--tune", TRIALS, "--tune-lengths", LENGTH, "--tune-dir", tune_dir)
    first = edgejit_proc(*cmd)
    deadline = time.monotonic() + 300
    while _records_measured(tune_dir) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    measured_at_interrupt = _records_measured(tune_dir)
    first.send_signal(signal.SIGINT)
    out1, err1 = first.communicate(timeout=120)
    second = edgejit_proc(*cmd)
    out2, err2 = second.communicate(timeout=900)
    return {
        "art": art, "root": root, "tune_dir": tune_dir, "measured_at_interrupt": measured_at_interrupt,
        "first": (first.returncode, out1, err1), "second": (second.returncode, out2, err2),
    }


def test_interrupt_keeps_the_search_and_the_same_command_resumes(tuned):
    rc, out, err = tuned["first"]
    assert rc == 130, err
    assert "edgejit compile: interrupted" in err
    assert "trials" in err  # progress was shown
    assert tuned["measured_at_interrupt"] >= 2
    assert not tuned["art"].exists() or tuned["second"][0] == 0
    rc, out, err = tuned["second"]
    assert rc == 0, err
    # resumed (or, if the interrupt came during the last batch, found the search complete)
    assert "resuming," in out or "nothing left to search" in out
    assert "trials already measured" in out
    assert [p.name for p in tuned["root"].iterdir() if p.name.startswith(".art.")] == []  # no temp artifact left


def test_artifact_carries_records_for_its_target(tuned):
    art = tuned["art"]
    m = json.loads((art / "manifest.json").read_text())
    doc = json.loads((art / "tuning.json").read_text())
    assert m["files"]["tuning.json"] == sha256_file(art / "tuning.json")
    assert m["tuning"]["trials_per_length"] == TRIALS and m["tuning"]["lengths"] == [LENGTH]
    assert doc["target"] == m["target"]["tvm"] and doc["requires"] == m["target"]["requires"]
    assert doc["dims"] == ["batch", "seq"] and doc["seq_dim"] == "seq"
    assert doc["lengths"][str(LENGTH)]["bind"] == {"batch": 1, "seq": LENGTH}
    assert len(doc["records"]) == m["tuning"]["records"] >= 1  # the layer norms, at least
    tasks = doc["lengths"][str(LENGTH)]["tasks"]
    for rec in doc["records"]:
        task = next(t for t in tasks if t["name"] == rec["name"])
        assert task["kept"] and task["tuned_ms"] < task["default_ms"]
    assert any(t.get("skipped", "").startswith("dense kernel") for t in tasks)
    check = doc["lengths"][str(LENGTH)]["check"]
    assert check["max_rel_diff"] <= 1e-4 and check["ms_tuned"] > 0


def _inputs(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 128, (batch, length)), "attention_mask": np.ones((batch, length), np.int64),
            "token_type_ids": np.zeros((batch, length), np.int64)}


def _close(got, want):
    return all(np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("isolate", [True, False])
def test_jit_builds_tuned_batch1_variants_that_match_onnxruntime(tuned, wide_bert_onnx, tmp_path, isolate):
    sess = ort.InferenceSession(str(wide_bert_onnx), providers=["CPUExecutionProvider"])
    policy = JitPolicy.load(min_hits=1, isolate=isolate)
    with edge.Runtime(tuned["art"], jit=policy, cache_dir=tmp_path / "c", state_dir=tmp_path / "s") as rt:
        rt.run(_inputs(1, LENGTH))
        rt.run(_inputs(1, 16))
        assert rt.specializer.wait_idle(300)
        for batch, length in ((1, LENGTH), (1, LENGTH - 5), (2, LENGTH), (1, 16)):
            x = _inputs(batch, length, seed=length + batch)
            assert _close(rt.run(x), sess.run(None, x)), (batch, length)
        stats = rt.specializer.stats()
    assert stats["tuned_lengths"] == [LENGTH]
    v = stats["variants"]
    assert v[LENGTH]["state"] == "ready" and v[LENGTH]["tuned"] and not v[16]["tuned"]
    # the first request (before the variant was ready) and the batch-2 one ran on the generic module
    assert stats["lengths"][LENGTH]["served"] == {"generic": 2, "variant": 1}
    assert stats["lengths"][LENGTH - 5]["served"] == {"padded": 1}
    key = rt.specializer.key_fields(LENGTH)
    assert key["bind"] == {"batch": 1, "seq": LENGTH} and key["tuning_sha256"]
    assert rt.specializer.key_fields(16)["bind"] == {"seq": 16}


def test_records_apply_to_the_shape_they_were_tuned_for(tuned):
    """Every kept record matches its function at the tuned shape (batch 1); none matches while
    batch is symbolic, which is why tuned variants bind batch = 1."""
    import tvm
    from tvm import relax

    from edge import kernels

    art = edge.Runtime(tuned["art"]).artifact
    recs = TuningRecords.load(art.file("tuning.json"), art.target, art.manifest.target.requires)
    mod = tvm.ir.load_json(art.file("module.json").read_text())
    target = tvm.target.Target(art.target)
    from deploy.compiler.tuner import _not_tunable

    kept = sorted(r["name"] for r in recs.data["records"])
    lowered = kernels.lower(relax.transform.BindSymbolicVars({"batch": 1, "seq": LENGTH})(mod), target)
    with target:
        recs.apply(lowered)
    assert recs.applied == kept
    lowered = kernels.lower(relax.transform.BindSymbolicVars({"seq": LENGTH})(mod), target)
    symbolic = {gv.name_hint for gv, f in lowered.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and _not_tunable(f) == "symbolic shape"}
    with target:
        recs.apply(lowered)
    assert symbolic and not symbolic & set(recs.applied)  # only shape-independent ones (a weight transpose) match


def test_records_are_never_applied_to_another_target(tuned):
    path = tuned["art"] / "tuning.json"
    for preset in ("x86-64-avx2", "aarch64", "rpi5"):
        with pytest.raises(ArtifactError, match="never applied across targets"):
            TuningRecords.load(path, get_preset(preset).target)


def test_runtime_ignores_records_of_another_target(tuned, wide_bert_onnx, tmp_path, caplog):
    """An artifact whose tuning.json names another target (copied in, manifest re-hashed): the JIT
    says so once and builds untuned variants; results stay correct."""
    art = tmp_path / "art"
    shutil.copytree(tuned["art"], art)
    doc = json.loads((art / "tuning.json").read_text())
    doc["target"] = get_preset("x86-64-avx2").target
    (art / "tuning.json").write_text(json.dumps(doc))
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["tuning.json"] = sha256_file(art / "tuning.json")
    (art / "manifest.json").write_text(json.dumps(m))
    sess = ort.InferenceSession(str(wide_bert_onnx), providers=["CPUExecutionProvider"])
    with caplog.at_level(logging.ERROR, logger="edgejit.jit"):
        with edge.Runtime(art, jit=JitPolicy.load(min_hits=1, isolate=False), cache_dir=tmp_path / "c", state_dir=tmp_path / "s") as rt:
            rt.run(_inputs(1, LENGTH))
            assert rt.specializer.wait_idle(300)
            x = _inputs(1, LENGTH, seed=3)
            assert _close(rt.run(x), sess.run(None, x))
            stats = rt.specializer.stats()
    assert stats["tuned_lengths"] == [] and stats["variants"][LENGTH]["state"] == "ready"
    assert "never applied across targets" in caplog.text


def test_tune_refuses_a_target_that_does_not_run_here(wide_bert_onnx, tmp_path):
    p = edgejit_proc("compile", wide_bert_onnx, "--target", "rpi5", "-o", tmp_path / "a", "--tune", 4)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert err.strip().count("\n") == 0 and "does not run here" in err
    assert not (tmp_path / "a").exists()


def test_unusable_tune_dir_is_one_line_error(tiny_onnx, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = edgejit_proc("compile", tiny_onnx, "-o", tmp_path / "a", "--tune", 4, "--tune-dir", blocker / "sub")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1
    assert err.strip().count("\n") == 0 and "cannot keep the search state" in err
    assert not (tmp_path / "a").exists()


def test_bad_lengths_and_missing_extras(monkeypatch):
    from deploy.compiler import tuner as tune

    assert tune.parse_lengths(None, 100) == [16, 32, 64]
    assert tune.parse_lengths("64, 8", 100) == [8, 64]
    for bad in ("0", "abc", "101"):
        with pytest.raises(EdgeJitError, match="--tune-lengths"):
            tune.parse_lengths(bad, 100)
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(EdgeJitError, match=r"xgboost.*pip install"):
        tune.preflight(get_preset("host"), 4)
