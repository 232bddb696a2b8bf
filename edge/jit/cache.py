"""The on-disk cache of compiled variants.

Content-addressed: the key is a hash of everything that changes the generated code. Each entry is
`<key>.so` plus `<key>.json` (its metadata, written last, so an entry without metadata is
incomplete). An entry is loaded only if the library's sha256 matches the metadata and the metadata
carries a valid HMAC made with this device's secret, which lives outside the cache: a file that
another user or process drops into the directory is never loaded. The directory is owner-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

from edge import machine
from edge.artifact.reader import sha256_file
from edge.files import copy_atomic, write_atomic

log = logging.getLogger("edgejit.jit")


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEJIT_CACHE_DIR") or machine.cache_dir("variants"))


def default_state_dir() -> Path:
    return Path(os.environ.get("EDGEJIT_STATE_DIR") or machine.state_dir())


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def device_secret(state_dir: Path) -> bytes:
    """This device's cache-signing secret (created on first use, owner-only)."""
    path = state_dir / "cache-secret"
    try:
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) >= 16:
            return secret
        raise ValueError("too short")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # damaged: start over (existing entries will be rebuilt)
        log.warning("JIT cache secret %s is unusable (%s): making a new one", path, e)
        path.unlink(missing_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    try:  # publish complete, and only if no other process published first
        write_atomic(path, secret.hex().encode(), 0o600, exclusive=True)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    return secret


class VariantCache:
    def __init__(self, root: Path, *, max_bytes: int, secret: bytes):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._secret = secret
        self.usable = True
        self.why_unusable = ""
        self.corrupt = 0  # entries found broken and deleted
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.root.stat()
            if st.st_uid != os.getuid():
                self._disable(f"cache directory {self.root} belongs to another user")
            elif st.st_mode & 0o077:
                os.chmod(self.root, 0o700)
        except OSError as e:
            self._disable(f"cache directory {self.root} unusable: {e.strerror or e}")

    def _disable(self, why: str) -> None:
        if self.usable:
            log.warning("JIT cache disabled, serving compiled variants from memory only: %s", why)
        self.usable, self.why_unusable = False, why

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.so", self.root / f"{key}.json"

    def _mac(self, meta: dict) -> str:
        body = json.dumps({k: v for k, v in meta.items() if k != "hmac"}, sort_keys=True).encode()
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    @contextlib.contextmanager
    def lock(self, key: str):
        """An exclusive lock on one key, across threads and processes (no-op if the cache is unusable)."""
        if not self.usable:
            yield
            return
        try:
            fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            self._disable(f"cannot create lock files in {self.root}: {e.strerror or e}")
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, key: str, dest_dir: Path) -> Path | None:
        """Verify the entry for `key` and copy its library into `dest_dir` (private to this
        process); returns the copy's path, or None. Broken entries are deleted.

        The copy is what gets loaded: what was verified is exactly what runs, even if the cache
        file changes afterwards, and the dynamic loader (which caches libraries by path) never
        hands back a stale library after an entry was rebuilt."""
        if not self.usable:
            return None
        so, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return self._drop(key, "unreadable metadata")
        if not isinstance(meta, dict) or not hmac.compare_digest(str(meta.get("hmac", "")), self._mac(meta)):
            return self._drop(key, "metadata not signed by this device")
        if meta.get("key") != key:
            return self._drop(key, "metadata for another key")
        try:
            data = so.read_bytes()
        except OSError:
            return self._drop(key, "library missing")
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return self._drop(key, "library does not match its checksum")
        copy = Path(tempfile.mkstemp(prefix=f"{key[:16]}.", suffix=".so", dir=dest_dir)[1])
        copy.write_bytes(data)
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # least-recently-used order
        return copy

    def _drop(self, key: str, why: str) -> None:
        self.corrupt += 1
        log.warning("JIT cache: deleting entry %s: %s", key[:12], why)
        for p in self._paths(key):
            with contextlib.suppress(OSError):
                p.unlink()
        return None

    def put(self, key: str, library: Path, fields: dict) -> Path | None:
        """Store a compiled library; returns its cache path, or None if the cache cannot take it."""
        if not self.usable:
            return None
        so, meta_path = self._paths(key)
        try:
            copy_atomic(library, so, 0o600)
            meta = {"key": key, "size": so.stat().st_size, "sha256": sha256_file(so), "fields": fields}
            meta["hmac"] = self._mac(meta)
            write_atomic(meta_path, json.dumps(meta, indent=1).encode())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
                self._disable(f"cannot write to {self.root}: {e.strerror}")
                return None
            raise
        self.evict(keep=key)
        return so

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of every complete entry, oldest first."""
        out = []
        for meta_path in self.root.glob("*.json"):
            key = meta_path.stem
            try:
                size = (self.root / f"{key}.so").stat().st_size + meta_path.stat().st_size
                out.append((meta_path.stat().st_mtime, size, key))
            except OSError:
                continue
        return sorted(out)

    def evict(self, keep: str | None = None) -> list[str]:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted = []
        for _, size, key in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            for p in self._paths(key):
                with contextlib.suppress(OSError):
                    p.unlink()
            total -= size
            evicted.append(key)
        return evicted
