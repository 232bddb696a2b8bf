"""A runtime lets go of what it loaded (issue 20, case 1): closing it unloads its JIT variants, and a
runtime that is dropped (closed or not; no garbage-collector pass needed) unloads its generic
module and variants and removes its JIT work directory. A request still running on a variant
keeps that library loaded until it ends."""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest

import edge
from edge.jit.policy import JitPolicy
from tests.fixtures import handmade

POLICY = JitPolicy(mode="on", buckets="pow2", min_bucket=4, min_hits=1, isolate=False, preload="lazy")
LENGTHS = (5, 9)  # variants 8 and 16


def mapped(root) -> list[str]:
    """Shared libraries under `root` (or deleted ones named so) mapped into this process."""
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if p.startswith(str(root)) and ".so" in p)


def warmed(artifact, tmp_path) -> edge.Runtime:
    rt = edge.Runtime(artifact, jit=POLICY, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
    for seq in LENGTHS:
        rt.run(handmade.inputs(1, seq))
    assert rt.specializer.wait_idle(120)
    assert rt.specializer.ready_lengths() == [8, 16]
    return rt


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    """A private copy: its generic.so is loaded by nothing else in this process."""
    return shutil.copytree(tiny_artifact, tmp_path / "art")


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_close_unloads_variants_and_a_dropped_runtime_everything(artifact, tmp_path, no_gc):
    rt = warmed(artifact, tmp_path)
    scratch = rt.specializer._scratch
    assert len(mapped(scratch)) == 2 and mapped(artifact) == [str(artifact.resolve() / "generic.so")]
    want = rt.run(handmade.inputs(2, 7))
    rt.close()
    assert mapped(scratch) == []  # variants unloaded at close ...
    np.testing.assert_allclose(rt.run(handmade.inputs(2, 7))[0], want[0], rtol=1e-6)  # ... the generic module still serves
    del rt
    assert mapped(artifact) == [] and not scratch.exists()


def test_a_dropped_unclosed_runtime_unloads_everything(artifact, tmp_path, no_gc):
    rt = warmed(artifact, tmp_path)
    scratch = rt.specializer._scratch
    del rt
    assert mapped(scratch) == [] and mapped(artifact) == [] and not scratch.exists()


def test_a_request_running_on_a_variant_keeps_it_until_it_ends(artifact, tmp_path, no_gc):
    rt = warmed(artifact, tmp_path)
    scratch = rt.specializer._scratch
    x = handmade.inputs(1, 5)
    want = rt.run(x)
    route = rt.specializer.route(5, {"batch": 1, "seq": 5})  # what a request in flight holds
    rt.close()
    del rt
    assert len(mapped(scratch)) == 1  # the library of the variant in use, nothing else
    from edge.runtime.signature import bind_inputs

    arrays, _ = bind_inputs(route.spec.artifact.inputs, x, route.spec.artifact.manifest.dims)
    outs, kind = route.run(arrays, 5)
    assert kind == "padded"
    np.testing.assert_allclose(outs[0], want[0], rtol=1e-6)
    del route, outs
    assert mapped(scratch) == [] and mapped(artifact) == []
