"""The models the daemon serves, and how a new artifact version replaces a running one.

A reload builds the new runtime completely beside the old one (manifest, checksums, signature,
CPU features, library load, one smoke inference). Only if all of that passes is the new version
swapped in, with one reference assignment under a lock; otherwise the old version keeps serving
(rollback) and the reason is reported. Requests hold a reference to the version they started
on, so a swap never interrupts them; the old version is closed when its last request ends.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import ArtifactError, EdgeJitError
from edge.runtime.memory import release_memory
from edge.runtime.signature import bind_inputs

log = logging.getLogger("edgejit.daemon")


class ModelNotFound(EdgeJitError):
    pass


class ModelUnavailable(EdgeJitError):
    """The model exists but cannot serve right now (still loading, or its load failed)."""


@dataclass(eq=False)
class Version:
    """One loaded artifact version of a model."""

    runtime: object
    artifact_path: Path
    version: str  # sha256 of manifest.json, first 12 hex digits
    loaded_at: float
    load_s: float
    resolved: Path | None = None  # the directory a symlinked artifact path pointed to at load
    inflight: int = 0
    retired: bool = False

    def describe(self) -> dict:
        art = self.runtime.artifact
        return {
            "version": self.version,
            "artifact": str(self.artifact_path),
            "artifact_dir": str(self.resolved or self.artifact_path),
            "model": art.name,
            "model_sha256": art.model_sha256,
            "created": art.manifest.created,
            "target": art.manifest.target.preset,
            "precision": art.precision,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "load_s": round(self.load_s, 3),
        }


@dataclass(eq=False)
class ModelSlot:
    name: str
    artifact_path: Path
    state: str = "loading"  # loading | ready | failed
    error: str = ""
    current: Version | None = None
    previous: dict | None = None  # describe() of the version the last swap replaced
    lock: threading.Lock = field(default_factory=threading.Lock)
    reload_lock: threading.Lock = field(default_factory=threading.Lock)


def manifest_version(path: Path) -> str:
    try:
        return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:12]
    except OSError:
        return "?"


def smoke_inputs(runtime) -> dict[str, np.ndarray]:
    """A short, harmless input for the load check: token id 1, full mask, zero token types."""
    art = runtime.artifact
    dims = {d: max(1, lim.min) for d, lim in art.manifest.dims.items()}
    dims[art.seq_dim] = max(dims.get(art.seq_dim, 1), min(4, art.max_seq))
    out = {}
    for s in art.inputs:
        shape = tuple(d if isinstance(d, int) else dims.get(d, 1) for d in s.shape)
        lname = s.name.lower()
        fill = 0 if ("type" in lname or "segment" in lname or "position" in lname) else 1
        out[s.name] = np.full(shape, fill, dtype=s.dtype)
    return out


class Registry:
    def __init__(self, make_runtime):
        """`make_runtime(name, artifact_path) -> Runtime` builds a runtime with the daemon's settings."""
        self._make_runtime = make_runtime
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()

    # -- lookup ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def slots(self) -> list[ModelSlot]:
        with self._lock:
            return list(self._slots.values())

    def slot(self, name: str) -> ModelSlot:
        with self._lock:
            slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(f"no model named '{name}' (serving: {', '.join(self.names()) or 'none'})")
        return slot

    def acquire(self, name: str) -> Version:
        """The version to run a request on; pair with release(). Never blocks on a reload."""
        slot = self.slot(name)
        with slot.lock:
            v = slot.current
            if v is None:
                if slot.state == "loading":
                    raise ModelUnavailable(f"model '{name}' is still loading")
                raise ModelUnavailable(f"model '{name}' failed to load: {slot.error}")
            v.inflight += 1
            return v

    def release(self, name: str, v: Version) -> None:
        slot = self.slot(name)
        with slot.lock:
            v.inflight -= 1
            close = v.retired and v.inflight == 0
        if close:
            self._close(name, v)

    # -- loading and swapping --------------------------------------------------------------
    def add(self, name: str, artifact_path: Path) -> ModelSlot:
        with self._lock:
            slot = self._slots.setdefault(name, ModelSlot(name, Path(artifact_path)))
        return slot

    def _load(self, slot: ModelSlot, path: Path) -> Version:
        start = time.monotonic()
        resolved = Path(path).resolve()  # load from one directory even if the link flips meanwhile
        version = manifest_version(resolved)
        runtime = self._make_runtime(slot.name, resolved)
        try:
            if getattr(runtime, "is_generation", False):  # a decoder: one token through its engine
                runtime.smoke_check()
                return Version(runtime, Path(path), version, time.time(), time.monotonic() - start, resolved=resolved)
            # The generic module directly: a load check is not traffic (no JIT hits, no metrics).
            arrays, _ = bind_inputs(runtime.inputs, smoke_inputs(runtime), runtime.artifact.manifest.dims)
            outs = runtime.generic(arrays)
            for spec, o in zip(runtime.outputs, outs):
                if o.dtype.kind == "f" and not np.isfinite(o).all():
                    raise ArtifactError(f"{path}: load check failed: output '{spec.name}' is not finite on a smoke input")
        except EdgeJitError as e:
            runtime.close()
            raise ArtifactError(f"{path}: load check failed: {e}") from None
        except Exception as e:
            runtime.close()
            raise ArtifactError(f"{path}: load check failed: {type(e).__name__}: {e}") from None
        return Version(runtime, Path(path), version, time.time(), time.monotonic() - start, resolved=resolved)

    def load(self, name: str) -> None:
        """First load of a configured model; a failure leaves the slot 'failed' (other models serve)."""
        slot = self.slot(name)
        log.info("loading model '%s' from %s ...", name, slot.artifact_path)
        try:
            v = self._load(slot, slot.artifact_path)
        except Exception as e:
            msg = str(e) if isinstance(e, EdgeJitError) else f"{type(e).__name__}: {e}"
            with slot.lock:
                slot.state, slot.error = "failed", msg
            log.error("model '%s' failed to load: %s", name, msg)
            return
        with slot.lock:
            slot.current, slot.state, slot.error = v, "ready", ""
        log.info("model '%s' ready: %s (version %s, loaded in %.1fs)", name, v.runtime.artifact.name, v.version, v.load_s)

    def reload(self, name: str, artifact_path: Path | None = None) -> dict:
        """Load the model's artifact again (or a new path) and swap it in if it passes its checks.
        Returns {"result": "swapped" | "unchanged", ...}; raises ArtifactError after a rollback."""
        slot = self.slot(name)
        with slot.reload_lock:  # one reload per model at a time
            path = Path(artifact_path) if artifact_path else slot.artifact_path
            old = slot.current
            if old is not None and manifest_version(path) == old.version and path.resolve() == old.resolved:
                return {"result": "unchanged", "current": old.describe()}
            log.info("reloading model '%s' from %s ...", name, path)
            if old is not None and old.runtime.specializer is not None:
                old.runtime.specializer.persist()  # the new version warm-starts from this profile
            try:
                new = self._load(slot, path)
            except Exception as e:
                msg = str(e) if isinstance(e, EdgeJitError) else f"{type(e).__name__}: {e}"
                if old is None:
                    with slot.lock:
                        slot.state, slot.error = "failed", msg
                    log.error("model '%s' failed to load: %s", name, msg)
                else:
                    log.error("model '%s': new version rejected, still serving version %s: %s", name, old.version, msg)
                release_memory()  # what the rejected version had loaded
                raise ArtifactError(msg) from None
            with slot.lock:
                slot.current, slot.state, slot.error = new, "ready", ""
                slot.artifact_path = path
                slot.previous = old.describe() if old else None
                close_old = False
                if old is not None:
                    old.retired = True
                    close_old = old.inflight == 0
            if close_old:
                self._close(name, old)
            log.info("model '%s' now serving version %s (was %s)", name, new.version, old.version if old else "none")
            return {"result": "swapped", "current": new.describe(), "previous": slot.previous}

    def _close(self, name: str, v: Version) -> None:
        """Close a version nothing runs on any more: its modules, JIT variants and weights are
        freed as the last references go (the slot and the requests held them)."""
        try:
            v.runtime.close()
        except Exception:
            log.exception("closing version %s of model '%s' failed", v.version, name)
        release_memory()  # cycles collected and free heap returned now: a swap must not grow the daemon

    def close_all(self) -> None:
        for slot in self.slots():
            with slot.lock:
                v, slot.current = slot.current, None
            if v is not None:
                self._close(slot.name, v)
