"""Artifact signing on the build host; the `edgejit keygen` front is deploy/cli/keygen.py.

Keys are Ed25519. The private key stays on the build host (PEM, PKCS#8, mode 0600; encrypted when
EDGEJIT_KEY_PASSPHRASE is set); the public key (PEM, `<name>.pub`) goes to the devices, which list
it in their trusted keys. Signing covers manifest.json byte for byte; the manifest holds the sha256
of every other file, so the signature covers the whole artifact. See edge/artifact/trust.py and
docs/security.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.errors import EdgeJitError
from edge.files import write_atomic
from edge.artifact.trust import SIGNATURE_FILE, key_id, raw_public_key, signature_document

PASSPHRASE_ENV = "EDGEJIT_KEY_PASSPHRASE"


class SigningKeyError(EdgeJitError):
    """A signing key cannot be made, read or used."""


def passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def public_path_for(private_path: Path) -> Path:
    private_path = Path(private_path)
    if private_path.suffix == ".key":
        return private_path.with_suffix(".pub")
    return private_path.with_name(private_path.name + ".pub")


def generate_keypair(private_path: str | Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair. Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = public_path_for(private_path)
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise SigningKeyError(f"{p} exists (pass --force to replace the key pair; artifacts signed with it stop verifying)")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    secret = passphrase()
    encryption = (serialization.BestAvailableEncryption(secret) if secret
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomic(private_path, private_pem, 0o600)
    write_atomic(public_path, public_pem, 0o644)
    return private_path, public_path, key_id(raw_public_key(key.public_key()))


def load_private_key(path: str | Path):
    """Read an Ed25519 private key (PEM, encrypted with EDGEJIT_KEY_PASSPHRASE if it is set)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"{path}: cannot read signing key: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase())
    except TypeError as e:  # encrypted without a passphrase, or a passphrase for a plain key
        raise SigningKeyError(f"{path}: {e} (set {PASSPHRASE_ENV} for an encrypted key)") from None
    except ValueError as e:
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        raise SigningKeyError(f"{path}: not a usable PEM private key ({first})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 private key ({type(key).__name__}); make one with `edgejit keygen`")
    return key


def sign_artifact(artifact_dir: str | Path, private_key) -> str:
    """Sign artifact_dir/manifest.json as it is on disk; writes manifest.sig. Returns the key id.

    `private_key` is an Ed25519PrivateKey or the path of one.
    """
    if isinstance(private_key, (str, Path)):
        private_key = load_private_key(private_key)
    artifact_dir = Path(artifact_dir)
    try:
        manifest = (artifact_dir / "manifest.json").read_bytes()
    except OSError as e:
        raise SigningKeyError(f"{artifact_dir}: cannot read manifest.json to sign it: {e.strerror}") from None
    kid = key_id(raw_public_key(private_key.public_key()))
    write_atomic(artifact_dir / SIGNATURE_FILE, signature_document(kid, private_key.sign(manifest)), 0o644)
    return kid
