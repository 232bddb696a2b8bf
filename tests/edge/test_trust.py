"""Signed artifacts: the runtime checks the manifest's Ed25519 signature against its trusted keys
before it reads anything else, and refuses tampered, wrongly signed or unsigned artifacts, each
with its own one-line message."""

from __future__ import annotations

import base64
import json
import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import edge
from deploy.compiler import signing as keys
from edge.artifact.reader import Artifact
from edge.errors import ArtifactError
from edge.runtime.module import CompiledModule
from edge.artifact.trust import SIGNATURE_FILE, Trust, TrustConfigError, TrustError
from tests.fixtures import handmade


@pytest.fixture(scope="module")
def keypairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    owner = keys.generate_keypair(d / "owner.key")
    stranger = keys.generate_keypair(d / "stranger.key")
    return {"owner": owner, "stranger": stranger}


@pytest.fixture
def signed(tiny_artifact, keypairs, tmp_path):
    """A copy of the shared tiny artifact, signed by the owner's key."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    keys.sign_artifact(dst, keypairs["owner"][0])
    return dst


@pytest.fixture
def owner_trust(keypairs):
    return Trust.load(keypairs["owner"][1])


def _refused(art, trust, match, error=TrustError):
    with pytest.raises(error, match=match) as e:
        edge.Runtime(art, trust=trust)
    assert "\n" not in str(e.value)
    return e.value


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_signed_artifact_loads_and_runs(signed, owner_trust, keypairs, tiny_onnx):
    rt = edge.Runtime(signed, trust=owner_trust)
    assert rt.artifact.signed_by == keypairs["owner"][2]
    x = handmade.inputs(2, 9)
    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, x)
    for got, want in zip(rt.run(x), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # trusted keys given as paths (a directory of .pub files) work the same
    assert edge.Runtime(signed, trust=[keypairs["owner"][1].parent]).artifact.signed_by == keypairs["owner"][2]


def test_tampered_library_refused(signed, owner_trust):
    _flip_byte(signed / "generic.so")
    err = _refused(signed, owner_trust, "checksum mismatch for generic.so", ArtifactError)
    assert not isinstance(err, TrustError)  # the signature is fine; the file is not


def test_tampered_manifest_refused(signed, owner_trust):
    m = json.loads((signed / "manifest.json").read_text())
    m["dims"]["seq"]["max"] = 100000
    (signed / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    _refused(signed, owner_trust, "bad signature: manifest.json was changed after signing")


def test_replaced_library_with_matching_manifest_refused(signed, owner_trust, tmp_path):
    """The full attack: swap the library and fix up the manifest's checksum to match."""
    from edge.artifact.reader import sha256_file

    _flip_byte(signed / "generic.so")
    m = json.loads((signed / "manifest.json").read_text())
    m["files"]["generic.so"] = sha256_file(signed / "generic.so")
    (signed / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    _refused(signed, owner_trust, "bad signature")


def test_unknown_key_refused(signed, owner_trust, keypairs):
    keys.sign_artifact(signed, keypairs["stranger"][0])
    err = _refused(signed, owner_trust, "signed by key .* which is not one of the 1 trusted key")
    assert keypairs["stranger"][2][:16] in str(err)


def test_missing_signature_refused_when_keys_configured(signed, owner_trust):
    (signed / SIGNATURE_FILE).unlink()
    _refused(signed, owner_trust, r"not signed \(manifest.sig missing\) and this runtime only loads signed artifacts")


def test_forged_signature_file_refused(signed, owner_trust, keypairs):
    doc = json.loads((signed / SIGNATURE_FILE).read_text())
    doc["signature"] = base64.b64encode(b"\0" * 64).decode()
    (signed / SIGNATURE_FILE).write_text(json.dumps(doc))
    _refused(signed, owner_trust, "bad signature")
    (signed / SIGNATURE_FILE).write_text("{not json")
    _refused(signed, owner_trust, "unreadable signature file")


def test_signature_checked_before_anything_is_loaded(signed, owner_trust, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("loaded something from an unverified artifact")

    monkeypatch.setattr(CompiledModule, "load", boom)
    monkeypatch.setattr(Artifact, "load_params", boom)
    (signed / "manifest.json").write_bytes(b"{ this is not even JSON")
    _refused(signed, owner_trust, "bad signature")  # not a JSON error: the bytes are checked first


def test_allow_unsigned_loads_with_a_warning(signed, keypairs, caplog):
    (signed / SIGNATURE_FILE).unlink()
    trust = Trust.load(keypairs["owner"][1], allow_unsigned=True)
    with caplog.at_level(logging.WARNING, logger="edgejit.trust"):
        rt = edge.Runtime(signed, trust=trust)
    assert rt.artifact.signed_by is None
    assert "UNSIGNED artifact" in caplog.text and "allow_unsigned" in caplog.text


def test_allow_unsigned_still_refuses_bad_signatures(signed, keypairs):
    trust = Trust.load(keypairs["owner"][1], allow_unsigned=True)
    keys.sign_artifact(signed, keypairs["stranger"][0])
    _refused(signed, trust, "not one of the 1 trusted key")
    keys.sign_artifact(signed, keypairs["owner"][0])
    (signed / "manifest.json").write_text((signed / "manifest.json").read_text().replace('"fp32"', '"int8"'))
    _refused(signed, trust, "bad signature")


def test_default_without_keys_loads_but_says_so(tiny_artifact, caplog):
    with caplog.at_level(logging.WARNING, logger="edgejit.trust"):
        edge.Runtime(tiny_artifact)
    assert "without a signature check: no trusted keys are configured" in caplog.text


def test_require_signature_without_keys_is_a_config_error():
    with pytest.raises(TrustConfigError, match="no trusted keys are configured"):
        Trust(require_signature=True)
    with pytest.raises(TrustConfigError, match="contradict"):
        Trust(allow_unsigned=True, require_signature=True)


def test_config_must_name_keys_or_allow_unsigned(keypairs, tmp_path):
    with pytest.raises(TrustConfigError, match="no trusted_keys configured") as e:
        Trust.from_config({})
    assert "\n" not in str(e.value)
    assert not Trust.from_config({"allow_unsigned": True}).signature_required
    t = Trust.from_config({"trusted_keys": [str(keypairs["owner"][1]), str(keypairs["stranger"][1])]})
    assert t.signature_required and set(t.keys) == {keypairs["owner"][2], keypairs["stranger"][2]}
    with pytest.raises(TrustConfigError, match="allow_unsigned must be true or false"):
        Trust.from_config({"allow_unsigned": "yes"})


def test_key_file_formats(keypairs, tmp_path):
    pub = serialization.load_pem_public_key(keypairs["owner"][1].read_bytes())
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "raw.pub").write_text(base64.b64encode(raw).decode() + "\n")
    assert set(Trust.load(tmp_path / "raw.pub").keys) == {keypairs["owner"][2]}

    bad = {
        "private.pem": (keypairs["owner"][0].read_bytes(), "is a private key"),
        "ec.pem": (ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "not an Ed25519 key"),
        "short.pub": (base64.b64encode(b"x" * 16), "is 32 bytes, this one is 16"),
        "junk.pub": (b"hello", "neither PEM nor base64"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TrustConfigError, match=message) as e:
            Trust.load(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(TrustConfigError, match="does not exist"):
        Trust.load(tmp_path / "nope.pub")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrustConfigError, match="holds no"):
        Trust.load(tmp_path / "empty")
