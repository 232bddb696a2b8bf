"""params.npz on the device: written with every array 64-byte aligned, mapped in place (no copy of
the weights in the process's own memory), older/unaligned or compressed files copied one array at a
time, broken or replaced files refused with one line."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge.artifact import params as P
from edge.artifact.reader import Artifact
from edge.errors import ArtifactError

ARRAYS = [np.arange(1000, dtype=np.float32).reshape(10, 100), np.asfortranarray(np.arange(12, dtype=np.int8).reshape(3, 4)),
          np.float32(3.5), np.zeros((0, 5), np.float16), np.arange(7, dtype=np.uint8), np.ones((3, 33), np.float16)]


def _check(tensors, arrays):
    assert len(tensors) == len(arrays)
    for t, a in zip(tensors, arrays):
        got = t.numpy()
        assert got.dtype == a.dtype and got.shape == np.shape(a) and np.array_equal(got, a)


def test_written_aligned_and_readable_by_numpy(tmp_path):
    path = P.write_params(tmp_path / "params.npz", ARRAYS)
    with np.load(path, allow_pickle=False) as z:  # still a plain .npz
        for i, a in enumerate(ARRAYS):
            assert np.array_equal(z[f"p{i}"], a) and z[f"p{i}"].shape == np.shape(a)
    with open(path, "rb") as f:
        offsets = [P._array_header(path, f, info)[3] for info in P._zip_entries(path, f)]
    assert all(o % P.ALIGN == 0 for o in offsets)
    _check(P.device_tensors(path), ARRAYS)


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_numpy_written_files_load(tmp_path, writer):
    """Artifacts written before the aligned layout (np.savez), and compressed archives."""
    path = tmp_path / "params.npz"
    writer(path, **{f"p{i}": a for i, a in enumerate(ARRAYS)})
    _check(P.device_tensors(path), ARRAYS)


def test_mapped_weights_take_no_private_memory(tmp_path):
    """64 MiB of weights load without a copy: the process's anonymous memory does not grow, the
    pages are the file's (shared with the page cache), and the values are right."""
    path = P.write_params(tmp_path / "params.npz", [np.full((4, 1 << 22), i, np.float32) for i in range(1, 5)])
    code = f"""
import numpy as np
from edge.runtime.tvm_library import load_tvm
load_tvm()
from edge.artifact import params as P
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
a0 = anon()
ts = P.device_tensors({str(path)!r})
sums = [float(t.numpy().sum()) for t in ts]  # touches every page (and copies each array once, briefly)
print(sums, (anon() - a0) / 2**20)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sums, grown = r.stdout.rsplit("]", 1)
    assert [float(x) for x in sums.strip("[").split(",")] == [i * 4.0 * (1 << 22) for i in range(1, 5)]
    assert float(grown) < 16, r.stdout  # 64 MiB copied would show as >= 64


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a zip"), "not a zip file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5000]), "not a readable weights file"),
    (lambda p: np.savez(p, p0=np.array([{"a": 1}], dtype=object)), "holds Python objects"),
    (lambda p: np.savez(p, p0=np.zeros(3), p2=np.zeros(3)), "no p1.npy"),
])
def test_broken_files_refused(tmp_path, damage, message):
    path = P.write_params(tmp_path / "params.npz", ARRAYS)
    damage(path)
    with pytest.raises(ArtifactError, match=message) as e:
        P.device_tensors(path)
    assert "\n" not in str(e.value)


def test_replaced_after_verification_refused(tiny_artifact, tmp_path):
    art_dir = tmp_path / "art"
    shutil.copytree(tiny_artifact, art_dir)
    art = Artifact.open(art_dir)
    assert len(art.device_params()) == len(art.load_params())
    params = art_dir / "params.npz"
    shutil.copy(params, tmp_path / "same.npz")  # the same bytes, another file
    os.replace(tmp_path / "same.npz", params)
    with pytest.raises(ArtifactError, match="changed since its checksum was verified"):
        art.device_params()
