"""The variant cache on its own: LRU size bound, verification, and one compile per key across processes."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from edge.jit.cache import VariantCache, cache_key, device_secret


@pytest.fixture
def cache(tmp_path):
    return VariantCache(tmp_path / "c", max_bytes=3 * 1100, secret=device_secret(tmp_path / "state"))


def lib(tmp_path, name, size=1000):
    p = tmp_path / name
    p.write_bytes(os.urandom(size))
    return p


def test_roundtrip_returns_a_private_verified_copy(cache, tmp_path):
    src = lib(tmp_path, "a.so")
    key = cache_key({"n": 1})
    stored = cache.put(key, src, {"n": 1})
    copy = cache.get(key, tmp_path)
    assert copy is not None and copy != stored and copy.read_bytes() == src.read_bytes()
    assert cache.get(cache_key({"n": 2}), tmp_path) is None


def test_size_bound_evicts_least_recently_used(cache, tmp_path):
    keys = [cache_key({"n": i}) for i in range(4)]
    cache.max_bytes = 10**6
    for i, k in enumerate(keys[:3]):
        cache.put(k, lib(tmp_path, f"{i}.so"), {"n": i})
    cache.max_bytes = sum(size for _, size, _ in cache.entries()) + 100  # room for exactly three
    past = time.time() - 100
    for i, k in enumerate(keys[:3]):  # make the order unambiguous: 0 oldest ... 2 newest
        os.utime(cache.root / f"{k}.json", (past + i, past + i))
    assert cache.get(keys[0], tmp_path) is not None  # a use makes 0 the most recent
    cache.put(keys[3], lib(tmp_path, "3.so"), {"n": 3})
    present = {k for _, _, k in cache.entries()}
    assert keys[1] not in present  # the least recently used went
    assert {keys[0], keys[2], keys[3]} <= present
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes


def test_entry_under_another_secret_is_refused(cache, tmp_path):
    key = cache_key({"n": 1})
    cache.put(key, lib(tmp_path, "a.so"), {"n": 1})
    other = VariantCache(cache.root, max_bytes=10**6, secret=b"another device" * 3)
    assert other.get(key, tmp_path) is None
    assert not (cache.root / f"{key}.so").exists()


def test_two_processes_compile_a_key_once(tiny_artifact, tmp_path):
    """Two runtimes on one cache, same hot length at the same moment: one compiles, the other waits
    on the key's lock and loads the result."""
    script = tmp_path / "p.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, edge
        from tests.fixtures import handmade
        events = []
        class L:
            def on_request(self, *a): pass
            def on_jit(self, m, e): events.append(e["event"])
        rt = edge.Runtime({str(tiny_artifact)!r}, jit={{"min_hits": 1, "buckets": "exact", "isolate": False}},
                          cache_dir={str(tmp_path / 'cache')!r}, state_dir=sys.argv[1], listeners=[L()])
        while time.time() < float(sys.argv[2]):
            time.sleep(0.005)
        rt.run(handmade.inputs(1, 47))
        rt.specializer.wait_idle(300)
        print(",".join(events))
        rt.close()
    """))
    start = time.time() + 8  # both processes are ready by then
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "state"), str(start)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    compiles = sum(o.split(",").count("compile_finished") for o in outs)
    hits = sum(o.split(",").count("cache_hit") for o in outs)
    assert (compiles, hits) == (1, 1), outs
