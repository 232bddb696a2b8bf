"""`edgejit keygen`: make an Ed25519 key pair for signing artifacts (deploy/compiler/signing.py)."""

from __future__ import annotations

import sys

from deploy.compiler.signing import PASSPHRASE_ENV, generate_keypair, passphrase


def add_arguments(p) -> None:
    p.add_argument("key", help="private key file to write (e.g. keys/release.key); the public key goes "
                   "next to it as .pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")


def main(args) -> int:
    private, public, kid = generate_keypair(args.key, force=args.force)
    enc = "encrypted with $" + PASSPHRASE_ENV if passphrase() else "unencrypted, mode 0600"
    print(f"private key: {private} ({enc}); keep it on the build host")
    print(f"public key:  {public} (copy to devices and list it in trusted_keys)")
    print(f"key id:      {kid}")
    sys.stdout.flush()
    return 0
