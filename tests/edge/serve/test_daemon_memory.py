"""Hot swaps do not grow the daemon (issue 20, case 1): after many swaps (POST /reload alternating
two artifact versions, then symlink flips + SIGHUP) the real daemon process's RSS stays within a
small bound of its level after the first swap, and the only compiled libraries it still maps are
the current version's (no old generic.so, no old JIT variant, nothing deleted)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import edge
from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, write_config

VOCAB, HIDDEN, FFN = 32768, 256, 1024  # a 32 MiB embedding: a version that leaked would show in RSS
WEIGHTS_MB = (VOCAB * HIDDEN + 2 * HIDDEN * FFN) * 4 / 2**20
JIT = {"policy": "on", "buckets": "pow2", "min_bucket": 4, "min_hits": 1, "max_variants": 4, "isolate": False}
LENGTHS = (5, 9, 17)  # three variants (8, 16, 32) per version


def fat_encoder(path: Path, seed: int) -> Path:
    """input_ids, attention_mask [batch, seq] -> hidden [batch, seq, HIDDEN]: embedding, a
    two-layer MLP, masked. Small to compile, heavy in weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, FFN), dtype=np.float32) * 0.05, "w1"),
        numpy_helper.from_array(rng.standard_normal((FFN, HIDDEN), dtype=np.float32) * 0.05, "w2"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis_last"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m2"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["m2", "mask3"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes, "fat_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def inputs(seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), dtype=np.int64)}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two versions of the fat encoder (different weights) side by side, as an updater lays them out."""
    from deploy.compiler.driver import compile_model

    root = tmp_path_factory.mktemp("fat")
    arts = root / "artifacts"
    out = {}
    for seed, name in ((1, "v1"), (2, "v2")):
        out[name] = compile_model(fat_encoder(root / f"{name}.onnx", seed), "host", arts / name, max_seq=64, log=lambda *a: None)
    return out


def memory(pid: int) -> tuple[float, list[str]]:
    """(RSS in MiB, the compiled model libraries mapped: generic.so and JIT variants)."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    with open(f"/proc/{pid}/maps") as f:
        libs = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return rss, sorted(p for p in libs if p.endswith((".so", ".so (deleted)")) and ("edgejit-jit-" in p or p.endswith("generic.so")))


def test_hot_swaps_release_old_versions(versions, tmp_path):
    v1, v2 = versions["v1"], versions["v2"]
    with edge.Runtime(v1) as r1, edge.Runtime(v2) as r2:
        want = {name: {seq: rt.run(inputs(seq))[0] for seq in LENGTHS} for name, rt in (("v1", r1), ("v2", r2))}
    current = v1.parent / "current"
    current.symlink_to("v1")
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"fat": current}, server={"port": port}, jit=JIT,
                       paths={"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")})
    d = DaemonProcess(cfg, port, tmp_path / "daemon.log").start()
    errors, stop = [], threading.Event()

    def check(name: str, conn=None) -> None:
        for seq in LENGTHS:
            status, got, headers = d.infer("fat", inputs(seq), conn=conn)
            if status != 200:
                errors.append((status, got))
            elif name == "either":
                if not any(np.allclose(got["hidden"], w[seq], atol=1e-4) for w in want.values()):
                    errors.append(f"seq {seq}: the result of neither version")
            elif not np.allclose(got["hidden"], want[name][seq], atol=1e-4):
                errors.append(f"seq {seq}: not {name}'s result ({headers.get('X-Edgejit-Module')})")

    def traffic() -> None:  # requests running on the old version while it is swapped out
        conn = d.conn()
        while not stop.is_set():
            check("either", conn)
        conn.close()

    def warm(name: str) -> None:
        """Requests until every length is served by a variant of this version."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            check(name)
            _, doc = d.get("/v1/models/fat")
            if sorted(doc.get("jit", {}).get("ready_lengths", [])) == [8, 16, 32]:
                check(name)
                return
            time.sleep(0.1)
        raise AssertionError(f"variants of {name} not ready: {doc.get('jit')}")

    def swapped(name: str, how: str) -> None:
        if how == "reload":
            status, _, data = d.request("POST", "/v1/models/fat/reload", json.dumps({"artifact": str(versions[name])}).encode())
            assert status == 200 and json.loads(data)["result"] == "swapped", data
        else:  # the operator's way: flip the link, SIGHUP
            current.unlink()
            current.symlink_to(name)
            d.signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while d.get("/v1/models/fat")[1].get("artifact_dir") != str(versions[name].resolve()):
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.1)
        warm(name)
        time.sleep(0.3)  # the old version closes once its last request (of `traffic`) ends

    samples = []
    try:
        warm("v1")
        loader = threading.Thread(target=traffic)
        loader.start()
        try:
            order = ["v2", "v1"] * 6
            for i, name in enumerate(order):
                swapped(name, "reload" if i < 6 else "sighup")
                rss, libs = memory(d.proc.pid)
                samples.append((i + 1, name, round(rss, 1), libs))
        finally:
            stop.set()
            loader.join()
        time.sleep(0.5)
        final_rss, final_libs = memory(d.proc.pid)
    finally:
        assert d.stop() == 0, d.log()
    report = "\n".join(f"swap {i:2d} -> {n}: RSS {rss} MiB, {len(libs)} libraries mapped" for i, n, rss, libs in samples)
    print(f"\nweights per version {WEIGHTS_MB:.0f} MiB\n{report}\nafter the traffic: RSS {final_rss:.1f} MiB")
    assert not errors, errors[:5]
    for i, name, _, libs in samples:
        # the current version's generic module and its three variants (private copies in one work dir)
        assert not [p for p in libs if "(deleted)" in p], (i, libs)
        generic = [p for p in libs if p.endswith("generic.so")]
        assert generic == [str(versions[name].resolve() / "generic.so")], (i, libs)
        variants = [p for p in libs if "edgejit-jit-" in p]
        assert len(variants) == 3 and len({Path(p).parent for p in variants}) == 1, (i, libs)
    first = samples[0][2]
    assert max(rss for _, _, rss, _ in samples) - first < WEIGHTS_MB / 2, report
    assert final_rss - first < WEIGHTS_MB / 2, report
    assert "Traceback" not in d.log()


@pytest.mark.slow  # the tiny llamas (shared with the generation tests) and a decode variant compile
def test_decoder_swaps_release_old_versions(tiny_llamas, tmp_path):
    """The same for a text-generation model: its engine, KV cache, generic module and decode
    variants go with the version a reload replaced."""
    import shutil

    models = tmp_path / "models"
    for name in ("a", "b"):  # one model in two directories: each reload is a new version to load
        shutil.copytree(tiny_llamas["gqa_tied"][1], models / name)
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": models / "a"}, server={"port": port},
                       generation={"max_seqs": 2, "context": 256},
                       jit={"policy": "on", "min_hits": 1, "isolate": False},
                       paths={"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")})
    ask = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode()
    samples, texts = [], []
    with DaemonProcess(cfg, port, tmp_path / "daemon.log") as d:
        for i, name in enumerate(["b", "a"] * 5):
            status, _, data = d.request("POST", "/v1/models/tiny/reload", json.dumps({"artifact": str(models / name)}).encode())
            assert status == 200 and json.loads(data)["result"] == "swapped", data
            deadline = time.monotonic() + 60
            while True:  # generate until the batch-1 decode variant of this version serves
                status, _, data = d.request("POST", "/v1/completions", ask)
                assert status == 200, data
                texts.append(json.loads(data)["choices"][0]["text"])
                if d.get("/v1/models/tiny")[1].get("jit", {}).get("ready_batch_sizes") == [1]:
                    break
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.2)
            current = str((models / name).resolve() / "generic.so")
            settle = time.monotonic() + 15
            while True:  # the replaced version goes once its engine thread has let go of it
                rss, libs = memory(d.proc.pid)
                if [p for p in libs if p.endswith("generic.so")] == [current] or time.monotonic() > settle:
                    break
                time.sleep(0.2)
            samples.append((i + 1, name, round(rss, 1), libs))
        log = d.log()
    report = "\n".join(f"swap {i:2d} -> {n}: RSS {rss} MiB, {len(libs)} libraries mapped" for i, n, rss, libs in samples)
    print("\n" + report)
    assert len(set(texts)) == 1, texts  # every version generates the same (greedy) text
    for i, name, _, libs in samples:
        assert not [p for p in libs if "(deleted)" in p], (i, libs)
        assert [p for p in libs if p.endswith("generic.so")] == [str((models / name).resolve() / "generic.so")], (i, libs)
        assert len([p for p in libs if "edgejit-jit-" in p]) == 1, (i, libs)
    assert max(rss for _, _, rss, _ in samples) - samples[1][2] < 32, report
    assert "Traceback" not in log
