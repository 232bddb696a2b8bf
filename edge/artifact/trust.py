"""Which artifacts this device will run: Ed25519 signatures over the manifest, checked before loading.

The manifest lists the sha256 of every file in the artifact, so a signature over the manifest's
exact bytes covers the whole artifact. The signature lives next to it in `manifest.sig`:

    {"format": 1, "algorithm": "ed25519", "key_id": "<sha256 of the raw public key>",
     "signature": "<base64>"}

Policy (see docs/security.md for the reasoning):
- trusted keys configured, or require_signature=True: only artifacts signed by one of those keys load;
- allow_unsigned=True: unsigned artifacts load with a warning in the log (a signature that is present
  is still checked, and a bad one is still refused);
- neither (the programmatic default of edge.Runtime): nothing to check against, so artifacts load
  with a warning saying that no signature was checked. Configuration files (`Trust.from_config`,
  used by the daemon) do not get this default: they must name trusted keys or allow unsigned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import ArtifactError, EdgeJitError

log = logging.getLogger("edgejit.trust")

SIGNATURE_FILE = "manifest.sig"
SIGNATURE_FORMAT = 1
ALGORITHM = "ed25519"
PUBLIC_KEY_SUFFIXES = (".pub", ".pem")


class TrustError(ArtifactError):
    """An artifact's signature is missing, wrong, or from a key this device does not trust."""


class TrustConfigError(EdgeJitError):
    """The trusted keys or the signature policy are misconfigured."""


def key_id(raw: bytes) -> str:
    """The id of a public key: sha256 of its 32 raw bytes, hex."""
    return hashlib.sha256(raw).hexdigest()


def raw_public_key(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_key(data: bytes, source: str = "public key"):
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or the raw 32 bytes in base64."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in text.split(b"\n", 1)[0]:
            raise TrustConfigError(f"{source}: is a private key; devices need only the public key (.pub)")
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as e:
            raise TrustConfigError(f"{source}: not a readable PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise TrustConfigError(f"{source}: not an Ed25519 key ({type(key).__name__})")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TrustConfigError(f"{source}: neither PEM nor base64 of a raw Ed25519 public key") from None
    if len(raw) != 32:
        raise TrustConfigError(f"{source}: a raw Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _key_files(entry: Path) -> list[Path]:
    if entry.is_dir():
        files = sorted(p for p in entry.iterdir() if p.suffix in PUBLIC_KEY_SUFFIXES and p.is_file())
        if not files:
            raise TrustConfigError(f"{entry}: trusted keys directory holds no *.pub or *.pem files")
        return files
    if entry.is_file():
        return [entry]
    raise TrustConfigError(f"{entry}: trusted key file or directory does not exist")


@dataclass(frozen=True)
class Trust:
    """The public keys this device trusts and what to do with unsigned artifacts.

    `keys` maps key id -> Ed25519PublicKey. Build one with `Trust.load(paths, ...)` (files or
    directories of PEM / base64 public keys) or `Trust.from_config(dict)`.
    """

    keys: dict = field(default_factory=dict)
    allow_unsigned: bool = False
    require_signature: bool | None = None  # None: required as soon as any key is configured
    quiet: bool = False  # allow_unsigned asked for explicitly (e.g. `edgejit run --allow-unsigned`): log at info, not warning

    def __post_init__(self):
        if self.allow_unsigned and self.require_signature:
            raise TrustConfigError("allow_unsigned and require_signature contradict each other: set one")
        if self.require_signature and not self.keys:
            raise TrustConfigError("signed artifacts are required but no trusted keys are configured")

    @property
    def signature_required(self) -> bool:
        if self.require_signature is not None:
            return self.require_signature
        return bool(self.keys) and not self.allow_unsigned

    @classmethod
    def load(
        cls,
        trusted_keys: str | Path | list | tuple | None = None,
        *,
        allow_unsigned: bool = False,
        require_signature: bool | None = None,
    ) -> "Trust":
        if isinstance(trusted_keys, (str, Path)):
            trusted_keys = [trusted_keys]
        keys = {}
        for entry in trusted_keys or ():
            for path in _key_files(Path(entry).expanduser()):
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise TrustConfigError(f"{path}: cannot read trusted key: {e.strerror}") from None
                key = parse_public_key(data, str(path))
                keys[key_id(raw_public_key(key))] = key
        return cls(keys, allow_unsigned=allow_unsigned, require_signature=require_signature)

    @classmethod
    def from_config(cls, config: dict) -> "Trust":
        """From a config mapping with `trusted_keys` (path or list of paths) and `allow_unsigned`.

        Stricter than the programmatic default: a config must either name trusted keys or say
        `allow_unsigned: true`, so a device never runs unsigned code because a key was forgotten.
        """
        keys = config.get("trusted_keys")
        allow = config.get("allow_unsigned", False)
        if not isinstance(allow, bool):
            raise TrustConfigError(f"config: allow_unsigned must be true or false, not {allow!r}")
        if keys in (None, "", []) and not allow:
            raise TrustConfigError(
                "config: no trusted_keys configured; set trusted_keys to the public key(s) artifacts are "
                "signed with (edgejit keygen), or allow_unsigned: true to run unsigned artifacts"
            )
        if keys is not None and not isinstance(keys, (str, list)):
            raise TrustConfigError("config: trusted_keys must be a path or a list of paths")
        return cls.load(keys, allow_unsigned=allow, require_signature=None if allow else bool(keys))

    def describe(self) -> str:
        if self.signature_required:
            return f"signed artifacts only ({len(self.keys)} trusted key(s))"
        if self.allow_unsigned:
            return f"unsigned artifacts allowed ({len(self.keys)} trusted key(s) for signed ones)"
        return "no trusted keys configured: signatures are not checked"

    # -- verification ---------------------------------------------------------------------
    def verify(self, artifact_dir: Path, manifest_bytes: bytes) -> str | None:
        """Check the signature over `manifest_bytes` (the manifest exactly as read from disk).

        Returns the signing key's id, or None when the artifact is loaded without a checked
        signature (allowed by policy, and logged). Raises TrustError otherwise.
        """
        sig_path = Path(artifact_dir) / SIGNATURE_FILE
        if not sig_path.exists():
            if self.signature_required:
                raise TrustError(
                    f"{artifact_dir}: not signed ({SIGNATURE_FILE} missing) and this runtime only loads "
                    "signed artifacts (compile with --sign KEY)"
                )
            self._warn_unchecked(artifact_dir, unsigned=True)
            return None
        kid, signature = read_signature(sig_path)
        key = self.keys.get(kid)
        if key is None:
            if not self.keys and not self.signature_required:
                self._warn_unchecked(artifact_dir, unsigned=False, kid=kid)
                return None
            raise TrustError(f"{artifact_dir}: signed by key {kid[:16]}…, which is not one of the {len(self.keys)} trusted key(s)")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise TrustError(
                f"{artifact_dir}: bad signature: manifest.json was changed after signing, or the signature is forged"
            ) from None
        return kid

    def _warn_unchecked(self, artifact_dir: Path, unsigned: bool, kid: str = "") -> None:
        what = f"UNSIGNED artifact {artifact_dir}" if unsigned else f"artifact {artifact_dir} (signed by key {kid[:16]}…)"
        if self.allow_unsigned:
            (log.info if self.quiet else log.warning)(
                "loading %s without a signature check: unsigned artifacts are allowed (allow_unsigned)", what)
        else:
            log.warning(
                "loading %s without a signature check: no trusted keys are configured "
                "(configure trusted keys to require signed artifacts)", what,
            )


def read_signature(sig_path: Path) -> tuple[str, bytes]:
    """Parse manifest.sig -> (key id, signature bytes). One-line TrustError when malformed."""
    try:
        doc = json.loads(sig_path.read_bytes())
    except (OSError, ValueError) as e:
        raise TrustError(f"{sig_path}: unreadable signature file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != ALGORITHM:
        raise TrustError(f"{sig_path}: not an {ALGORITHM} signature file of format {SIGNATURE_FORMAT}")
    kid, sig = doc.get("key_id"), doc.get("signature")
    if not isinstance(kid, str) or len(kid) != 64 or not isinstance(sig, str):
        raise TrustError(f"{sig_path}: signature file lacks a key_id or signature")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError(f"{sig_path}: signature is not valid base64") from None
    if len(signature) != 64:
        raise TrustError(f"{sig_path}: an Ed25519 signature is 64 bytes, this one is {len(signature)}")
    return kid.lower(), signature


def signature_document(kid: str, signature: bytes) -> bytes:
    """The bytes of manifest.sig (used by deploy.compiler.signing when signing)."""
    doc = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": kid,
           "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(doc, indent=2) + "\n").encode()
