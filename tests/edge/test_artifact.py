"""The runtime refuses artifacts that are incomplete, corrupt, or built for another machine."""

import json
import shutil

import pytest

import edge
from edge.artifact.reader import Artifact
from edge.errors import ArtifactError


@pytest.fixture
def art_copy(tiny_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_manifest_describes_the_artifact(tiny_artifact, tiny_onnx):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["format"] == 1
    assert m["model"]["sha256"] == Artifact.open(tiny_artifact).model_sha256
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert m["inputs"][0]["shape"] == ["batch", "seq"]
    assert m["inputs"][0]["range"] == [0, 63]  # token ids index a 64-row embedding table
    assert [o["name"] for o in m["outputs"]] == ["hidden", "pooled"]
    assert m["outputs"][0]["shape"] == ["batch", "seq", 32]
    assert m["seq_dim"] == "seq" and m["dims"]["seq"]["max"] == 128
    assert m["padding"]["safe"] and m["padding"]["mode"] == "attention_mask"
    assert m["tvm"]["tvm"].startswith("0.27") and m["tvm"]["ffi"] == "0.1.14.post1"
    assert m["target"]["arch"] == "x86_64" and m["target"]["tvm"]["kind"] == "llvm"
    assert set(m["files"]) >= {"generic.so", "module.json", "params.npz"}


def test_other_architecture_refused(art_copy):
    _edit_manifest(art_copy, lambda m: m["target"].update(arch="aarch64", preset="rpi5"))
    with pytest.raises(ArtifactError, match="built for aarch64 \\(preset rpi5\\), this machine is x86_64"):
        edge.Runtime(art_copy)


def test_missing_cpu_features_refused(art_copy):
    _edit_manifest(art_copy, lambda m: m["target"].update(requires=["avx2", "amx_tile_imaginary"]))
    with pytest.raises(ArtifactError, match="CPU features this machine lacks: amx_tile_imaginary"):
        edge.Runtime(art_copy)


def test_other_tvm_refused(art_copy):
    _edit_manifest(art_copy, lambda m: m["tvm"].update(tvm="0.26.0"))
    with pytest.raises(ArtifactError, match="built with TVM 0.26.0"):
        edge.Runtime(art_copy)


def test_changed_library_refused(art_copy):
    with open(art_copy / "generic.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    with pytest.raises(ArtifactError, match="checksum mismatch for generic.so"):
        edge.Runtime(art_copy)


def test_missing_file_refused(art_copy):
    (art_copy / "params.npz").unlink()
    with pytest.raises(ArtifactError, match="file params.npz listed in the manifest is missing"):
        edge.Runtime(art_copy)


@pytest.mark.parametrize("content, message", [(None, "no manifest.json"), ("{not json", "unreadable manifest"), ('{"format": 99}', "format 99 is not supported")])
def test_broken_manifest_refused(art_copy, content, message):
    if content is None:
        (art_copy / "manifest.json").unlink()
    else:
        (art_copy / "manifest.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        edge.Runtime(art_copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        edge.Runtime(tmp_path / "nothing")
