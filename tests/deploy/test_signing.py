"""`edgejit keygen` and `compile --sign`: real keys, a real compile, the signature checked with
the cryptography library directly (not with our own verifier)."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.compiler import signing as keys
from deploy.compiler.driver import compile_model
from edge import cli
from edge.artifact.trust import SIGNATURE_FILE, key_id, raw_public_key


@pytest.fixture
def model(tiny_onnx):
    return tiny_onnx


def test_keygen_cli_writes_owner_only_private_key_and_public_key(tmp_path, capsys):
    assert cli.main(["keygen", str(tmp_path / "k" / "release.key")]) == 0
    private, public = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    pub = serialization.load_pem_public_key(public.read_bytes())
    priv = keys.load_private_key(private)
    assert raw_public_key(priv.public_key()) == raw_public_key(pub)
    out = capsys.readouterr().out
    assert key_id(raw_public_key(pub)) in out

    # never overwrites a key pair silently: one-line error, exit status 1
    assert cli.main(["keygen", str(private)]) == 1
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--force" in err and "\n" not in err
    assert keys.load_private_key(private).private_bytes_raw() == priv.private_bytes_raw()


def test_passphrase_protected_key(tmp_path, monkeypatch):
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "correct horse")
    private, _, kid = keys.generate_keypair(tmp_path / "enc.key")
    assert b"ENCRYPTED" in private.read_bytes()
    assert key_id(raw_public_key(keys.load_private_key(private).public_key())) == kid
    monkeypatch.delenv(keys.PASSPHRASE_ENV)
    with pytest.raises(keys.SigningKeyError, match=keys.PASSPHRASE_ENV):
        keys.load_private_key(private)


def test_compile_sign_signs_the_manifest_bytes(model, tmp_path, capsys):
    private, public, kid = keys.generate_keypair(tmp_path / "release.key")
    out = tmp_path / "art"
    assert cli.main(["compile", str(model), "-o", str(out), "--sign", str(private)]) == 0
    assert f"signed manifest with key {kid[:16]}" in capsys.readouterr().out
    manifest_bytes = (out / "manifest.json").read_bytes()
    sig = json.loads((out / SIGNATURE_FILE).read_text())
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == kid
    serialization.load_pem_public_key(public.read_bytes()).verify(base64.b64decode(sig["signature"]), manifest_bytes)
    # the manifest stays the signed object: it lists every other file, not its own signature
    listed = set(json.loads(manifest_bytes)["files"])
    assert listed >= {"generic.so", "module.json", "params.npz"} and SIGNATURE_FILE not in listed

    # `run --trust` loads it with the right key, refuses it with another one
    assert cli.main(["run", str(out), "--trust", str(public), "--input", "input_ids=[[1,2,3]]"]) == 0
    assert "pooled: shape [1, 32]" in capsys.readouterr().out
    _, other, _ = keys.generate_keypair(tmp_path / "other.key")
    assert cli.main(["run", str(out), "--trust", str(other), "--input", "input_ids=[[1,2,3]]"]) == 1
    assert "edgejit run: error:" in capsys.readouterr().err


def test_compile_refuses_unusable_keys_before_compiling(model, tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "junk.key").write_text("not a key\n")
    cases = {"ec.key": "not an Ed25519 private key", "junk.key": "not a usable PEM private key",
             "missing.key": "cannot read signing key"}
    for name, message in cases.items():
        with pytest.raises(keys.SigningKeyError, match=message) as e:
            compile_model(model, "host", tmp_path / f"art-{name}", sign=tmp_path / name, log=lambda *_: None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"art-{name}").exists()
