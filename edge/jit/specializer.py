"""Observe sequence lengths, compile static-shape variants for the hot ones in the background,
and swap them in without blocking a request."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edge.runtime import pipeline as edge_build
from edge import machine
from edge.runtime import tuning_records as tuning
from edge.artifact.reader import edgejit_version, tvm_versions
from edge.runtime.module import CompiledModule
from edge.runtime.padding_policy import pad_inputs, slice_outputs
from edge.files import write_atomic
from edge.jit.cache import VariantCache, cache_key, default_cache_dir, default_state_dir, device_secret
from edge.jit.policy import JitPolicy, resolve

log = logging.getLogger("edgejit.jit")

# Work directories are named edgejit-jit-<pid>-<random> (in the temp directory): those of a process
# that is gone (killed mid-compile) are removed by the next process that starts a specializer.
SCRATCH_PREFIX = "edgejit-jit-"
_SCRATCH_RE = re.compile(r"^edgejit-jit-(\d+)-[^/]+$")
_cleaned = False
_clean_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_scratch(tmp: str | Path | None = None, *, force: bool = False) -> list[Path]:
    """Remove the JIT work directories left by processes that no longer run (once per process
    unless forced); directories of live processes (and unnamed ones) are left alone."""
    global _cleaned
    with _clean_lock:
        if _cleaned and not force:
            return []
        _cleaned = True
    removed = []
    root = Path(tmp or tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _SCRATCH_RE.match(d.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    if removed:
        log.info("removed %d JIT work director%s left by stopped processes", len(removed), "y" if len(removed) == 1 else "ies")
    return removed


@dataclass
class LengthStats:
    hits: int = 0
    served: Counter = field(default_factory=Counter)  # module kind -> requests


@dataclass
class VariantState:
    state: str = "none"  # none | queued | compiling | ready | failed | evicted | uncached
    hits: int = 0  # requests whose bucket is this length
    compile_s: float | None = None
    attempts: int = 0
    retry_at: float = 0.0
    error: str = ""
    cache_hits: int = 0
    cache_misses: int = 0
    source: str = ""  # "compiled", "cache" or "artifact" (compiled into it: compile --decode-variants)


class Route:
    """Serves one request from a variant, padding to the variant's length when needed."""

    def __init__(self, spec, module: CompiledModule, length: int):
        self.spec = spec
        self.module = module
        self.length = length

    def run(self, arrays, seq: int):
        art = self.spec.artifact
        if seq == self.length:
            return self.module(arrays), "variant"
        padded = pad_inputs(art.inputs, arrays, art.seq_dim, self.length)
        outs = self.module(padded)
        return slice_outputs(art.outputs, outs, art.seq_dim, seq), "padded"


class Specializer:
    def __init__(self, runtime, jit, *, cache_dir=None, state_dir=None):
        # What it needs of the runtime, not the runtime itself: no reference cycle, so a dropped
        # runtime (and its weights and libraries) is freed at once, not at a later gc pass.
        self.artifact = runtime.artifact
        self._params, self._threads = runtime._params, runtime.threads
        self.listeners = runtime.listeners  # the runtime's list: listeners it adds later are seen
        self.policy: JitPolicy = resolve(jit)
        self.padding_safe = self.artifact.manifest.padding_safe
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.cache = VariantCache(
            Path(cache_dir) if cache_dir else default_cache_dir(),
            max_bytes=int(self.policy.cache_max_mb * 2**20),
            secret=device_secret(self.state_dir),
        )
        self._lock = threading.Lock()
        self._variants: dict[int, CompiledModule] = {}
        self._states: dict[int, VariantState] = defaultdict(VariantState)
        self._lengths: dict[int, LengthStats] = defaultdict(LengthStats)
        self._pool = ThreadPoolExecutor(self.policy.max_concurrent_compiles, thread_name_prefix="edgejit-jit")
        self._closed = False
        self._relax_mod = None
        clean_stale_scratch()
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, True)  # a specializer dropped unclosed
        self._workers: set = set()  # compile worker processes running now
        self.tuning = self._load_tuning()
        self._load_profile()
        if self.policy.mode != "off":
            self._load_shipped()
        if self.policy.mode != "off" and self.policy.preload == "startup":
            for length in self.hot_lengths():
                self._submit(length)

    def _load_shipped(self) -> None:
        """The variants compiled into the artifact (a decoder's decode steps, `compile --decode-variants`),
        ready before the first request: a short reply does not wait for a compile it would never see."""
        decoder = getattr(self.artifact.manifest, "decoder", None)
        for length, name in sorted((decoder.variants if decoder is not None else {}).items()):
            st = self._states[length]
            try:
                if name not in self.artifact.manifest.files:
                    raise FileNotFoundError(f"{name} is not one of the artifact's files")
                module = CompiledModule.load(self.artifact.file(name), self._params, kind="variant",
                                             bind={self.artifact.seq_dim: length}, threads=self._threads)
            except Exception as e:  # the JIT builds it instead
                log.error("not using %s's compiled variant %s: %s", self.artifact.name, name, e)
                continue
            self._variants[length] = module
            st.state, st.source = "ready", "artifact"
            self._emit("swapped_in", length, source="artifact")

    def _load_tuning(self):
        """The artifact's tuning records, or None (without them, or when they do not apply here)."""
        if tuning.FILE not in self.artifact.manifest.files:
            return None
        try:
            return tuning.TuningRecords.load(
                self.artifact.file(tuning.FILE), self.artifact.target, self.artifact.manifest.target.requires
            )
        except Exception as e:  # untuned variants are still correct: keep specializing without
            log.error("not applying %s's tuning records: %s", self.artifact.name, e)
            return None

    def tuned(self, length: int) -> bool:
        return self.tuning is not None and length in self.tuning.lengths

    def bind(self, length: int) -> dict[str, int]:
        """The static shape of the variant for this bucket: tuned lengths are tuned at batch 1,
        so their variants bind every other symbolic dim to 1 as well (the records match only
        that shape); other variants bind the sequence length alone and serve any batch."""
        return self.tuning.bind(length) if self.tuned(length) else {self.artifact.seq_dim: length}

    # -- serving ---------------------------------------------------------------------------
    def route(self, seq: int, dims: dict[str, int] | None = None) -> Route | None:
        """Pick the module for a request of length `seq` (None: the generic module); `dims`
        (every symbolic dim of the request) decides whether a batch-1 variant fits."""
        length = self.policy.target_length(seq, self.artifact.max_seq, self.padding_safe)
        with self._lock:
            self._lengths[seq].hits += 1
            st = self._states[length]
            st.hits += 1
            module = self._variants.get(length)
            if module is None and self._wants_compile(length, st):
                self._submit_locked(length, st)
        if module is None or not _fits(module.bind, dims, self.artifact.seq_dim):
            return None
        return Route(self, module, length)

    def record(self, seq: int, kind: str) -> None:
        with self._lock:
            self._lengths[seq].served[kind] += 1

    def _wants_compile(self, length: int, st: VariantState) -> bool:
        if self.policy.mode == "off" or self._closed:
            return False
        if st.state in ("queued", "compiling", "ready", "uncached"):
            return False
        if st.state == "failed" and (st.attempts >= self.policy.max_attempts or time.monotonic() < st.retry_at):
            return False
        return st.hits >= self.policy.min_hits and self._has_slot(length, st.hits)

    def _has_slot(self, length: int, hits: int) -> bool:
        busy = [n for n, s in self._states.items() if s.state in ("queued", "compiling", "ready")]
        if len(busy) < self.policy.max_variants:
            return True
        if self.policy.on_budget == "stop":
            return False
        ready = [n for n in busy if self._states[n].state == "ready"]
        coldest = min(ready, key=lambda n: self._states[n].hits, default=None)
        if coldest is None or self._states[coldest].hits >= hits:
            return False
        self._variants.pop(coldest, None)  # in-flight requests keep their reference
        self._states[coldest].state = "evicted"
        self._emit("evicted", coldest)
        return True

    # -- compiling -------------------------------------------------------------------------
    def prespecialize(self, lengths) -> None:
        """Compile (or load from cache) these lengths now, e.g. the fleet's hot lengths."""
        for seq in lengths:
            seq = int(seq)
            if 1 <= seq <= self.artifact.max_seq:
                self._submit(self.policy.target_length(seq, self.artifact.max_seq, self.padding_safe))

    def _submit(self, length: int) -> None:
        with self._lock:
            st = self._states[length]
            if self.policy.mode != "off" and st.state not in ("queued", "compiling", "ready") and self._has_slot(length, max(st.hits, self.policy.min_hits)):
                self._submit_locked(length, st)

    def _submit_locked(self, length: int, st: VariantState) -> None:
        st.state = "queued"
        self._pool.submit(self._job, length)

    def key_fields(self, length: int) -> dict:
        m = self.artifact.manifest
        return {
            "model_sha256": self.artifact.model_sha256,
            "module_sha256": m.files.get("module.json"),
            "tuning_sha256": m.files.get("tuning.json"),
            "bind": self.bind(length),
            "target": self.artifact.target,
            "arch": machine.arch(),
            "requires": m.target.requires,
            "versions": tvm_versions(),
            "precision": self.artifact.precision,
            "pipeline": edge_build.PIPELINE_VERSION,
            "edgejit": edgejit_version(),
        }

    def _job(self, length: int) -> None:
        if self._closed:
            return
        try:
            self._build_and_swap(length)
        finally:
            if self._closed:
                shutil.rmtree(self._scratch, ignore_errors=True)

    def _build_and_swap(self, length: int) -> None:
        st = self._states[length]
        fields = self.key_fields(length)
        key = cache_key(fields)
        try:
            with self.cache.lock(key):
                path = None if self.policy.mode == "redo" else self.cache.get(key, self._scratch)
                if path is not None:
                    st.cache_hits += 1
                    st.source = "cache"
                    self._emit("cache_hit", length)
                else:
                    st.cache_misses += 1
                    self._emit("cache_miss", length)
                    if self.policy.mode == "readonly":
                        with self._lock:
                            st.state = "uncached"
                        return
                    path = self._compile(length, key, fields, st)
                    if path is None:
                        return
                module = CompiledModule.load(
                    path, self._params, kind="variant", bind=fields["bind"], threads=self._threads
                )
        except Exception as e:  # a broken variant must never break serving
            self._fail(length, st, f"{type(e).__name__}: {e}")
            return
        with self._lock:
            if self._closed:
                return
            self._variants[length] = module
            st.state = "ready"
        self._emit("swapped_in", length, source=st.source)

    def _compile(self, length: int, key: str, fields: dict, st: VariantState) -> Path | None:
        with self._lock:
            st.state = "compiling"
        self._emit("compile_started", length)
        out = self._scratch / f"{key[:16]}.{uuid.uuid4().hex[:8]}.so"  # unique: dlopen caches by path
        start = time.perf_counter()
        if self.policy.isolate:
            from edge.jit.worker import compile_in_worker

            result = compile_in_worker(
                self.artifact, fields["bind"], out, tuned=self.tuned(length), running=self._workers,
                timeout_s=self.policy.compile_timeout_s, memory_mb=self.policy.compile_memory_mb,
                nice=self.policy.compile_nice,
            )
            if not result.ok:
                if not self._closed:  # a worker killed by close() was abandoned, not a compiler failure
                    log.error("compile worker output for %s=%d:\n%s", self.artifact.seq_dim, length, result.error)
                self._fail(length, st, result.reason or "compile worker failed")
                return None
        else:
            records = self.tuning if self.tuned(length) else None
            edge_build.export(edge_build.build(self._module(), self.artifact.target, bind=fields["bind"], tuning=records),
                              out, self.artifact.target)
            # The compiler leaves reference cycles through its frames, which reach back (f_back) to
            # this one and so to the weights: collect them now, not at some later gc pass.
            gc.collect()
        st.compile_s = time.perf_counter() - start
        st.source = "compiled"
        self._emit("compile_finished", length, duration_s=st.compile_s)
        self.cache.put(key, out, fields)  # if the cache is unusable, the variant lives in memory only
        return out

    def _module(self):
        if self._relax_mod is None:
            import tvm

            self._relax_mod = tvm.ir.load_json(self.artifact.file("module.json").read_text())
        return self._relax_mod

    def _fail(self, length: int, st: VariantState, error: str) -> None:
        if self._closed:  # abandoned at shutdown, not a compiler failure
            log.debug("JIT compile of %s=%d abandoned at shutdown: %s", self.artifact.seq_dim, length, error)
            return
        with self._lock:
            st.attempts += 1
            st.state = "failed"
            st.error = error
            st.retry_at = time.monotonic() + self.policy.backoff_s * 2 ** (st.attempts - 1)
        log.error("JIT compile of %s at %s=%d failed (attempt %d/%d): %s",
                  self.artifact.name, self.artifact.seq_dim, length, st.attempts, self.policy.max_attempts, error)
        self._emit("compile_failed", length, error=error)

    def _emit(self, event: str, length: int, **extra) -> None:
        payload = {"event": event, "bucket": length, **extra}
        for listener in self.listeners:
            on_jit = getattr(listener, "on_jit", None)
            if on_jit is not None:
                try:
                    on_jit(self.artifact.name, payload)
                except Exception:  # a listener must not break the JIT
                    log.exception("JIT listener failed")

    # -- observability and persistence -----------------------------------------------------
    def ready_lengths(self) -> list[int]:
        return sorted(self._variants)

    def stats(self) -> dict:
        with self._lock:
            return {
                "policy": self.policy.to_dict(),
                "padding_safe": self.padding_safe,
                "cache": {"dir": str(self.cache.root), "usable": self.cache.usable, "why": self.cache.why_unusable, "corrupt_dropped": self.cache.corrupt},
                "lengths": {n: {"hits": s.hits, "served": dict(s.served)} for n, s in sorted(self._lengths.items())},
                "tuned_lengths": self.tuning.lengths if self.tuning is not None else [],
                "variants": {
                    n: {"state": s.state, "tuned": self.tuned(n), "hits": s.hits, "compile_s": s.compile_s, "cache_hits": s.cache_hits,
                        "cache_misses": s.cache_misses, "attempts": s.attempts, "error": s.error, "source": s.source}
                    for n, s in sorted(self._states.items()) if s.state != "none" or s.hits
                },
            }

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Block until no compile is queued or running (for tests, benchmarks, demos)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(s.state in ("queued", "compiling") for s in self._states.values()):
                    return True
            time.sleep(0.02)
        return False

    def hot_lengths(self) -> list[int]:
        hot = [(s.hits, n) for n, s in self._states.items() if s.hits >= self.policy.min_hits]
        return [n for _, n in sorted(hot, reverse=True)[: self.policy.max_variants]]

    def _profile_path(self) -> Path:
        target = cache_key({"t": self.artifact.target, "p": self.artifact.precision})[:12]
        return self.state_dir / "profiles" / f"{self.artifact.name}-{self.artifact.model_sha256[:12]}-{target}.json"

    def _load_profile(self) -> None:
        try:
            data = json.loads(self._profile_path().read_text())
            for n, hits in data.get("buckets", {}).items():
                self._states[int(n)].hits = int(hits)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable shape profile %s: %s", self._profile_path(), e)

    def persist(self) -> None:
        """Save the observed-length profile (for the warm start after a restart)."""
        with self._lock:
            data = {
                "model": self.artifact.name,
                "model_sha256": self.artifact.model_sha256,
                "buckets": {str(n): s.hits for n, s in self._states.items() if s.hits},
                "lengths": {str(n): s.hits for n, s in self._lengths.items()},
            }
        path = self._profile_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(path, json.dumps(data, indent=1).encode())
        except OSError as e:
            log.warning("cannot save the shape profile to %s: %s", path, e.strerror or e)

    def close(self) -> None:
        """Stop specializing: queued compiles are dropped; a running one is abandoned (its worker
        process is killed) and cleans up after itself. The variants are let go: each library is
        unloaded once the last request running on it ends (requests hold their own reference)."""
        with self._lock:
            self._closed = True
            busy = any(s.state == "compiling" for s in self._states.values())
            self._variants.clear()
            self._relax_mod = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if busy and self.policy.isolate:
            # Kill the running compile: the process would otherwise wait for it at exit.
            from edge.jit.worker import abandon

            abandon(self._workers)
        self.persist()
        if not busy:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _fits(bind: dict[str, int], dims: dict[str, int] | None, seq_dim: str) -> bool:
    """Whether a request with these dims can run on a variant bound to `bind` (the sequence
    length is padded up to the variant's; any other bound dim must be equal)."""
    return all(dims is not None and dims.get(d) == v for d, v in bind.items() if d != seq_dim)
