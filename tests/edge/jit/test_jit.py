"""JIT specialization: variants for hot lengths, swapped in without changing any result."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edge
from edge.jit import JitPolicy
from edge.jit import specializer as specializer_mod
from tests.fixtures import handmade


class Events:
    def __init__(self):
        self.events = []
        self.requests = []
        self.lock = threading.Lock()

    def on_request(self, model, seq, kind, latency):
        with self.lock:
            self.requests.append((seq, kind))

    def on_jit(self, model, event):
        with self.lock:
            self.events.append(event)

    def names(self, bucket=None):
        return [e["event"] for e in self.events if bucket is None or e["bucket"] == bucket]


@pytest.fixture(scope="module")
def generic(tiny_artifact):
    return edge.Runtime(tiny_artifact)


@pytest.fixture
def dirs(tmp_path):
    return {"cache_dir": tmp_path / "cache", "state_dir": tmp_path / "state"}


def make(tiny_artifact, dirs, **policy):
    events = Events()
    policy.setdefault("isolate", False)
    policy.setdefault("min_hits", 2)
    rt = edge.Runtime(tiny_artifact, jit=JitPolicy.load(**policy), listeners=[events], **dirs)
    return rt, events


def same(a, b):
    return all(x.shape == y.shape and np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(y).max()) for x, y in zip(a, b))


def test_hot_length_gets_exact_variant(tiny_artifact, dirs, generic):
    rt, ev = make(tiny_artifact, dirs, buckets="exact")
    x = handmade.inputs(2, 37)
    for _ in range(2):
        assert same(rt.run(x), generic.run(x))
    assert rt.specializer.wait_idle(120)
    assert same(rt.run(x), generic.run(x))
    assert ev.requests[-1] == (37, "variant")
    assert ev.names(37) == ["cache_miss", "compile_started", "compile_finished", "swapped_in"]
    st = rt.specializer.stats()
    assert st["variants"][37]["state"] == "ready" and st["variants"][37]["compile_s"] > 0
    assert st["lengths"][37]["served"] == {"generic": 2, "variant": 1}
    rt.close()


def test_padded_bucket_keeps_results_exact(tiny_artifact, dirs, generic):
    rt, ev = make(tiny_artifact, dirs, buckets=[8, 32, 128])
    for seq in (9, 20, 31, 9):
        rt.run(handmade.inputs(1, seq, seed=seq))
    assert rt.specializer.wait_idle(120)
    assert rt.specializer.ready_lengths() == [32]
    for seq in (9, 17, 32):
        x = handmade.inputs(3, seq, seed=seq)
        x["attention_mask"][1, seq // 2:] = 0  # the caller's own padding stays respected
        assert same(rt.run(x), generic.run(x))
    assert [k for _, k in ev.requests[-3:]] == ["padded", "padded", "variant"]
    rt.close()


def test_unsafe_padding_gets_exact_variants_only(tmp_path, dirs):
    from deploy.compiler.driver import compile_model

    art = compile_model(handmade.encoder(tmp_path / "u.onnx", masked_pooling=False), "host", tmp_path / "u", max_seq=64, log=lambda *a: None)
    rt, ev = make(art, dirs, buckets="pow2")
    assert rt.specializer.padding_safe is False
    for _ in range(3):
        rt.run(handmade.inputs(1, 5))
    assert rt.specializer.wait_idle(120)
    assert rt.specializer.ready_lengths() == [5]  # not the pow2 bucket 16
    rt.close()


def test_concurrent_mixed_lengths_while_compiling(tiny_artifact, dirs, generic):
    """8 threads x 500 requests of mixed lengths while variants compile and swap in."""
    rt, ev = make(tiny_artifact, dirs, buckets="pow2", min_hits=5, max_variants=4)
    lengths = [3, 9, 17, 33, 60, 100, 128]
    rng = np.random.default_rng(0)
    cases = [handmade.inputs(1 + i % 2, int(rng.choice(lengths)), seed=i) for i in range(40)]
    expected = [generic.run(c) for c in cases]
    errors = []

    def client(t):
        for i in range(500):
            if i == 250:  # make sure the second half runs with variants swapped in (and more compiling)
                deadline = time.monotonic() + 120
                while len(rt.specializer.ready_lengths()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
            k = (t * 500 + i) % len(cases)
            try:
                if not same(rt.run(cases[k]), expected[k]):
                    errors.append((t, i, "mismatch"))
            except Exception as e:  # noqa: BLE001 - count every failure
                errors.append((t, i, repr(e)))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    assert errors == []
    assert rt.specializer.wait_idle(300)
    kinds = {k for _, k in ev.requests}
    assert {"generic", "padded"} <= kinds
    assert len(rt.specializer.ready_lengths()) == 4  # the budget
    rt.close()


def test_budget_stop_and_evict_coldest(tiny_artifact, dirs):
    rt, ev = make(tiny_artifact, dirs, buckets="exact", max_variants=1, on_budget="stop")
    for seq in (4, 4, 6, 6, 6):
        rt.run(handmade.inputs(1, seq))
        rt.specializer.wait_idle(120)
    assert rt.specializer.ready_lengths() == [4]
    rt.close()
    rt, ev = make(tiny_artifact, dirs, buckets="exact", max_variants=1, on_budget="evict_coldest")
    for seq in (4, 4, 6, 6, 6):
        rt.run(handmade.inputs(1, seq))
        rt.specializer.wait_idle(120)
    assert rt.specializer.ready_lengths() == [6]
    assert "evicted" in ev.names(4)
    rt.close()


def test_failed_compile_backs_off(tiny_artifact, dirs, generic, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(specializer_mod.edge_build, "build", broken)
    rt, ev = make(tiny_artifact, dirs, buckets="exact", backoff_s=3600)
    x = handmade.inputs(1, 11)
    for _ in range(50):
        assert same(rt.run(x), generic.run(x))
        rt.specializer.wait_idle(60)
    assert ev.names(11).count("compile_failed") == 1  # not retried in a loop
    v = rt.specializer.stats()["variants"][11]
    assert v["state"] == "failed" and "out of registers" in v["error"]
    rt.close()


def test_warm_start_loads_cached_variants_without_compiling(tiny_artifact, dirs, generic):
    rt, ev = make(tiny_artifact, dirs, buckets="exact")
    for _ in range(3):
        rt.run(handmade.inputs(1, 21))
    rt.specializer.wait_idle(120)
    rt.close()  # persists the profile

    rt2, ev2 = make(tiny_artifact, dirs, buckets="exact")  # preload = startup
    assert rt2.specializer.wait_idle(120)
    assert rt2.specializer.ready_lengths() == [21]
    assert ev2.names(21) == ["cache_hit", "swapped_in"]
    x = handmade.inputs(1, 21, seed=5)
    assert same(rt2.run(x), generic.run(x)) and ev2.requests[-1] == (21, "variant")
    rt2.close()


def test_modes_off_readonly_redo(tiny_artifact, dirs):
    rt, ev = make(tiny_artifact, dirs, buckets="exact", mode="off")
    for _ in range(5):
        rt.run(handmade.inputs(1, 13))
    assert rt.specializer.wait_idle(10) and ev.events == []
    rt.close()

    rt, ev = make(tiny_artifact, dirs, buckets="exact", mode="readonly", preload="lazy")
    for _ in range(5):
        rt.run(handmade.inputs(1, 13))
    rt.specializer.wait_idle(60)
    assert "compile_started" not in ev.names() and rt.specializer.ready_lengths() == []
    rt.close()

    rt, _ = make(tiny_artifact, dirs, buckets="exact", mode="on", preload="lazy")
    for _ in range(2):
        rt.run(handmade.inputs(1, 13))
    rt.specializer.wait_idle(120)
    rt.close()

    rt, ev = make(tiny_artifact, dirs, buckets="exact", mode="readonly", preload="lazy")
    for _ in range(3):
        rt.run(handmade.inputs(1, 13))
    rt.specializer.wait_idle(60)
    assert ev.names(13) == ["cache_hit", "swapped_in"]
    rt.close()

    rt, ev = make(tiny_artifact, dirs, buckets="exact", mode="redo", preload="lazy")
    for _ in range(3):
        rt.run(handmade.inputs(1, 13))
    rt.specializer.wait_idle(120)
    assert "compile_finished" in ev.names(13)
    rt.close()


def _cache_entry(dirs):
    libs = sorted(p for p in dirs["cache_dir"].glob("*.so") if not p.name.startswith("."))
    assert len(libs) == 1
    return libs[0]


def test_corrupt_entry_is_deleted_and_rebuilt(tiny_artifact, dirs, generic):
    rt, _ = make(tiny_artifact, dirs, buckets="exact")
    for _ in range(2):
        rt.run(handmade.inputs(1, 19))
    rt.specializer.wait_idle(120)
    rt.close()
    lib = _cache_entry(dirs)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))

    rt, ev = make(tiny_artifact, dirs, buckets="exact")
    assert rt.specializer.wait_idle(120)
    assert ev.names(19) == ["cache_miss", "compile_started", "compile_finished", "swapped_in"]
    assert rt.specializer.cache.corrupt == 1
    x = handmade.inputs(2, 19, seed=9)
    assert same(rt.run(x), generic.run(x))
    rt.close()


def test_other_tvm_or_target_never_loaded(tiny_artifact, dirs, monkeypatch):
    rt, _ = make(tiny_artifact, dirs, buckets="exact")
    for _ in range(2):
        rt.run(handmade.inputs(1, 23))
    rt.specializer.wait_idle(120)
    key_here = specializer_mod.cache_key(rt.specializer.key_fields(23))
    rt.close()
    monkeypatch.setattr(specializer_mod, "tvm_versions", lambda: {"tvm": "0.28.0", "ffi": "0.1.14.post1"})
    rt, ev = make(tiny_artifact, dirs, buckets="exact")
    assert specializer_mod.cache_key(rt.specializer.key_fields(23)) != key_here
    rt.specializer.wait_idle(120)
    assert ev.names(23)[0] == "cache_miss"
    rt.close()
    fields = dict(rt.specializer.key_fields(23), target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert specializer_mod.cache_key(fields) != key_here


def test_planted_file_is_never_loaded(tiny_artifact, dirs):
    """A library dropped into the cache under a valid key, with plausible metadata, is refused."""
    rt, _ = make(tiny_artifact, dirs, buckets="exact", mode="readonly")
    key = specializer_mod.cache_key(rt.specializer.key_fields(29))
    rt.close()
    cache = dirs["cache_dir"]
    planted = cache / f"{key}.so"
    planted.write_bytes((tiny_artifact / "generic.so").read_bytes())
    from edge.artifact.reader import sha256_file

    meta = {"key": key, "size": planted.stat().st_size, "sha256": sha256_file(planted), "fields": {}, "hmac": "0" * 64}
    (cache / f"{key}.json").write_text(json.dumps(meta))
    rt, ev = make(tiny_artifact, dirs, buckets="exact", mode="readonly")
    for _ in range(3):
        rt.run(handmade.inputs(1, 29))
    rt.specializer.wait_idle(60)
    assert rt.specializer.ready_lengths() == [] and ev.names(29) == ["cache_miss"]
    assert not planted.exists()  # deleted as foreign
    rt.close()


def test_cache_dir_is_owner_only(tiny_artifact, dirs):
    rt, _ = make(tiny_artifact, dirs, buckets="exact")
    for _ in range(2):
        rt.run(handmade.inputs(1, 31))
    rt.specializer.wait_idle(120)
    rt.close()
    assert (dirs["cache_dir"].stat().st_mode & 0o777) == 0o700
    for p in dirs["cache_dir"].iterdir():
        assert (p.stat().st_mode & 0o077) == 0, p


SCRIPT = textwrap.dedent("""
    import sys, numpy as np, edge
    from edge.jit import JitPolicy
    from tests.fixtures import handmade
    art, cache, state, mode = sys.argv[1:5]
    rt = edge.Runtime(art, jit=JitPolicy.load(isolate=False, min_hits=1, buckets="exact", mode=mode, preload="startup"),
                      cache_dir=cache, state_dir=state)
    g = edge.Runtime(art)
    print("ready", flush=True)
    for seq in [int(s) for s in sys.argv[5:]]:
        x = handmade.inputs(1, seq, seed=seq)
        rt.run(x); rt.specializer.wait_idle(120)
        a, b = rt.run(x), g.run(x)
        assert all(np.abs(p - q).max() < 1e-5 for p, q in zip(a, b)), seq
    print("served", sorted(rt.specializer.ready_lengths()), rt.specializer.cache.usable, repr(rt.specializer.cache.why_unusable), flush=True)
    rt.close()
""")


def _script(tmp_path, tiny_artifact, dirs, mode, lengths, wrap=()):
    path = tmp_path / "jit_script.py"
    path.write_text(SCRIPT)
    cmd = [*wrap, sys.executable, str(path), str(tiny_artifact), str(dirs["cache_dir"]), str(dirs["state_dir"]), mode, *map(str, lengths)]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return cmd, env


def test_killed_mid_write_leaves_no_loadable_partial(tiny_artifact, dirs, tmp_path):
    """SIGKILL a process while it writes cache entries; the next start neither crashes nor loads a partial entry."""
    cmd, env = _script(tmp_path, tiny_artifact, dirs, "on", [3, 4, 5, 6, 7, 8, 9, 10])
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    # half-written entries: a truncated library, and a library with no metadata
    for lib in list(dirs["cache_dir"].glob("[0-9a-f]*.so"))[:1]:
        lib.write_bytes(lib.read_bytes()[:1000])
    (dirs["cache_dir"] / ("e" * 64 + ".so")).write_bytes(b"\x7fELF partial")
    cmd, env = _script(tmp_path, tiny_artifact, dirs, "on", [3, 4, 5, 6, 7, 8, 9, 10])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "served [3, 4, 5, 6, 7, 8, 9, 10] True" in r.stdout


@pytest.mark.parametrize("mount_opts", ["ro", "size=12k"])
def test_read_only_or_full_cache_keeps_serving(tiny_artifact, dirs, tmp_path, mount_opts):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root) to mount a read-only or full file system")
    dirs["cache_dir"].mkdir(mode=0o700)
    cmd, env = _script(tmp_path, tiny_artifact, dirs, "on", [5, 6])
    mount = f"mount -t tmpfs -o {mount_opts},mode=0700 tmpfs {dirs['cache_dir']} && exec \"$@\""
    r = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", *cmd], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "served [5, 6] False" in r.stdout
    assert r.stderr.count("JIT cache disabled") == 1  # said once


def test_isolated_compile_serves_the_same_results(tiny_artifact, dirs, generic):
    rt, ev = make(tiny_artifact, dirs, buckets="exact", isolate=True)
    x = handmade.inputs(2, 41)
    for _ in range(2):
        rt.run(x)
    assert rt.specializer.wait_idle(300)
    assert same(rt.run(x), generic.run(x)) and ev.requests[-1] == (41, "variant")
    rt.close()


@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_compiler_crash_or_hang_leaves_serving_intact(tiny_artifact, dirs, generic, monkeypatch, fault):
    from edge.jit.worker import TEST_FAULT_ENV

    monkeypatch.setenv(TEST_FAULT_ENV, fault)
    rt, ev = make(tiny_artifact, dirs, buckets="exact", isolate=True, compile_timeout_s=20, backoff_s=3600)
    x = handmade.inputs(1, 43)
    for _ in range(3):
        assert same(rt.run(x), generic.run(x))
    stop = time.monotonic() + 60
    while time.monotonic() < stop and "compile_failed" not in ev.names(43):
        assert same(rt.run(x), generic.run(x))  # keeps serving on the generic module meanwhile
        time.sleep(0.05)
    assert rt.specializer.wait_idle(60)
    failed = [e for e in ev.events if e["event"] == "compile_failed"]
    assert len(failed) == 1
    assert ("SIGKILL" in failed[0]["error"] or "signal 9" in failed[0]["error"]) if fault == "sigkill" else "time" in failed[0]["error"]
    assert same(rt.run(x), generic.run(x)) and ev.requests[-1] == (43, "generic")
    rt.close()
