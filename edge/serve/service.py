"""The daemon: models, inference workers, HTTP server, telemetry, signals and a clean shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge import machine
from edge.errors import EdgeJitError
from edge.artifact.trust import Trust
from edge.serve import codec
from edge.serve.config import DaemonConfig, check_exposure
from edge.serve.metrics import Metrics
from edge.serve.registry import Registry
from edge.serve.server import Saturated, Server

log = logging.getLogger("edgejit.daemon")
jit_log = logging.getLogger("edgejit.daemon.jit")


class Progress:
    """Long work in progress (first loads, JIT compiles): listed in /health and, while it lasts,
    logged every `every_s` seconds so an operator watching the log sees the daemon is not stuck."""

    def __init__(self, every_s: float = 15.0):
        self.every_s = every_s
        self._tasks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="edgejit-progress", daemon=True)
        self._thread.start()

    def begin(self, task: str) -> None:
        with self._lock:
            self._tasks.setdefault(task, time.monotonic())

    def end(self, task: str) -> float:
        with self._lock:
            start = self._tasks.pop(task, None)
        return time.monotonic() - start if start is not None else 0.0

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"task": t, "elapsed_s": round(now - s, 1)} for t, s in self._tasks.items()]

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            tasks = [t for t in self.snapshot() if t["elapsed_s"] >= self.every_s]
            if tasks:
                log.info("still working: %s", ", ".join(f"{t['task']} ({t['elapsed_s']:.0f}s)" for t in tasks))

    def close(self) -> None:
        self._stop.set()


def _one_line(text) -> str:
    """The last meaningful line of a multi-line error (a compiler's output ends with the cause)."""
    lines = [ln.strip(" |") for ln in str(text or "").splitlines() if ln.strip(" |")]
    return lines[-1][:300] if lines else ""


class _Ticket:
    """An admitted request: done when both the worker and the HTTP handler let go of it."""

    def __init__(self, on_done):
        self._left = 2
        self._lock = threading.Lock()
        self._on_done = on_done

    def release(self) -> None:
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            self._on_done()


class ModelListener:
    """Runtime listener for one configured model: metrics, JIT progress logs, telemetry.
    Reports under the daemon's model name (the name in URLs), whatever the artifact calls itself."""

    def __init__(self, name: str, daemon: "Daemon"):
        self.name = name
        self.daemon = daemon

    def on_request(self, model_name, seq_len, module_kind, latency_s):
        self.daemon._last.kind = module_kind
        self.daemon._last.latency = latency_s
        self.daemon.metrics.on_request(self.name, seq_len, module_kind, latency_s)
        if self.daemon.telemetry is not None:
            self.daemon.telemetry.on_request(model_name, seq_len, module_kind, latency_s)

    def on_generation(self, model_name, stats):
        self.daemon.metrics.on_generation_speed(self.name, stats)
        if self.daemon.telemetry is not None:
            self.daemon.telemetry.on_generation(model_name, stats)

    def on_jit(self, model_name, event):
        self.daemon.metrics.on_jit(self.name, event)
        kind, length = event.get("event"), event.get("bucket", event.get("seq"))
        task = f"JIT compile of '{self.name}' at seq={length}"
        if kind == "compile_started":
            self.daemon.progress.begin(task)
            jit_log.info("compiling a variant of '%s' for seq=%s ...", self.name, length)
        elif kind == "compile_finished":
            self.daemon.progress.end(task)
            jit_log.info("compiled '%s' seq=%s in %.1fs", self.name, length, event.get("duration_s") or 0.0)
        elif kind == "compile_failed":
            self.daemon.progress.end(task)
            jit_log.warning("compile of '%s' seq=%s failed (the generic module keeps serving it): %s", self.name, length, _one_line(event.get("error")))
        elif kind == "swapped_in":
            jit_log.info("'%s' seq=%s now served by a specialized variant (%s)", self.name, length, event.get("source") or "compiled")
        elif kind == "evicted":
            jit_log.info("'%s' seq=%s variant evicted (variant budget)", self.name, length)
        else:
            jit_log.debug("'%s' seq=%s %s", self.name, length, kind)
        if self.daemon.telemetry is not None:
            self.daemon.telemetry.on_jit(model_name, event)


def _generation(version) -> bool:
    return getattr(version.runtime, "is_generation", False)


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        if not cfg.models:
            raise EdgeJitError(f"{cfg.path or 'config'}: no [[models]] to serve")
        self.cfg = cfg
        self.metrics = Metrics()
        self.progress = Progress()
        self.registry = Registry(self._make_runtime)
        self.max_body = int(cfg.server.max_body_mb * 2**20)
        self.threads = cfg.threads or max(1, machine.cores() // cfg.server.workers)
        self.draining = False
        self.telemetry = None
        self._fleet_hot: dict[str, list[int]] = {}
        self._last = threading.local()
        self._pool = ThreadPoolExecutor(cfg.server.workers, thread_name_prefix="edgejit-infer")
        self._pending = 0  # admitted requests not finished (queued or running)
        self._pending_lock = threading.Lock()
        self._idle = threading.Condition(self._pending_lock)
        self._stop = threading.Event()
        self._configured = {m.name: m.artifact for m in cfg.models}
        self.server: Server | None = None
        self._serve_thread = None
        self._jit = self._check_jit(cfg.jit)
        # signed artifacts only, unless the config explicitly allows unsigned ones (a startup error otherwise)
        self._trust = Trust.from_config({
            "trusted_keys": [str(k) for k in cfg.trusted_keys] or None, "allow_unsigned": cfg.allow_unsigned})
        log.info("artifact trust: %s", self._trust.describe())
        self._drain_timeout = cfg.server.drain_timeout_s
        self.metrics.gauges.append(self._gauges)

    # -- runtime construction ----------------------------------------------------------------
    @staticmethod
    def _check_jit(jit):
        if jit is None:
            return None
        from edge.jit.policy import resolve

        return resolve(jit)  # a bad policy is a startup error, not a per-model load failure

    def _make_runtime(self, name: str, path: Path):
        from edge.runtime.runtime import Runtime
        from edge.serve.generation import is_decoder_artifact

        if is_decoder_artifact(path):
            return self._make_generation(name, path)
        kwargs = dict(threads=self.threads, listeners=[ModelListener(name, self)])
        if self._jit is not None:
            kwargs.update(jit=self._jit, cache_dir=self.cfg.cache_dir, state_dir=self.cfg.state_dir)
        kwargs["trust"] = self._trust
        task = f"loading '{name}'"
        self.progress.begin(task)
        try:
            return Runtime(path, **kwargs)
        finally:
            self.progress.end(task)

    def _make_generation(self, name: str, path: Path):
        """A decoder artifact: the loaded model and its generation engine ([generation] settings)."""
        from edge.serve.generation import GenerationModel

        g = self.cfg.generation
        kwargs = dict(listeners=[ModelListener(name, self)])
        if self._jit is not None:  # decode steps specialized by batch size
            kwargs.update(jit=self._jit, cache_dir=self.cfg.cache_dir, state_dir=self.cfg.state_dir)
        task = f"loading '{name}'"
        self.progress.begin(task)
        try:
            return GenerationModel.load(path, context=g.context, max_seqs=g.max_seqs, max_queue=g.max_queue,
                                        timeout_s=g.request_timeout_s, prefill_chunk=g.prefill_chunk,
                                        prefix_cache_tokens=g.prefix_cache_tokens, kv_cache_mb=g.kv_cache_mb,
                                        threads=self.cfg.threads or machine.cores(), trust=self._trust, **kwargs)
        finally:
            self.progress.end(task)

    def configured_artifact(self, name: str) -> Path:
        return self._configured[name]

    # -- inference ------------------------------------------------------------------------
    def submit(self, name: str, body: bytes, content_type, accept):
        """Admit a request (or raise Saturated) and queue it for an inference worker. Returns
        (future, ticket); the caller releases the ticket once the response is written, so that a
        shutdown waits for the response, not just the computation."""
        limit = self.cfg.server.workers + self.cfg.server.queue
        with self._pending_lock:
            if self._pending >= limit:
                self.metrics.count_rejected("saturated")
                raise Saturated(f"server saturated ({limit} requests running or queued); retry shortly")
            self._pending += 1
        ticket = _Ticket(self._done)
        try:
            return self._pool.submit(self._run, ticket, name, body, content_type, accept), ticket
        except RuntimeError:  # the pool is shut down
            ticket.release()
            ticket.release()
            raise Saturated("the daemon is shutting down") from None

    def hold(self) -> None:
        """A generation request in flight (the engine bounds them): shutdown waits for it; pair with _done()."""
        with self._pending_lock:
            self._pending += 1

    def _done(self) -> None:
        with self._pending_lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def _run(self, ticket, name, body, content_type, accept):
        try:
            version = self.registry.acquire(name)
            try:
                rt = version.runtime
                inputs = codec.decode_inputs(body, content_type, rt.inputs, self.max_body)
                codec.check_batch(rt.inputs, inputs, self.cfg.server.max_batch)
                self._last.kind, self._last.latency = "generic", 0.0
                outputs = rt.run(inputs)
                info = {"version": version.version, "module": self._last.kind, "inference_ms": self._last.latency * 1e3}
                payload, media = codec.encode_outputs(name, rt.outputs, outputs, accept, {"version": version.version, "module": info["module"]})
                return payload, media, info
            finally:
                self.registry.release(name, version)
        finally:
            ticket.release()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Listen first (so /health shows the loading progress), then load the models."""
        srv = self.cfg.server
        warning = check_exposure(srv, str(self.cfg.path or "config"))  # before anything listens
        if warning:
            log.warning("%s", warning)
        for m in self.cfg.models:
            self.registry.add(m.name, m.artifact)
        try:
            self.server = Server((srv.host, srv.port), self)
        except OSError as e:
            raise EdgeJitError(f"cannot listen on {srv.host}:{srv.port}: {e.strerror or e}") from None
        host_, port = self.server.server_address[:2]
        self._serve_thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgejit-http", daemon=True)
        self._serve_thread.start()
        log.info("listening on http://%s:%d (%d inference workers x %d threads, queue %d, body limit %g MiB)",
                 host_, port, srv.workers, self.threads, srv.queue, srv.max_body_mb)
        self._start_telemetry()
        threading.Thread(target=self._load_all, name="edgejit-load", daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _load_all(self) -> None:
        for name in self.registry.names():
            if self._stop.is_set():
                return
            self.registry.load(name)
            self._announce(name)
        states = {s.name: s.state for s in self.registry.slots()}
        ready = sum(1 for s in states.values() if s == "ready")
        log.info("serving %d of %d models: %s", ready, len(states), ", ".join(f"{n} ({s})" for n, s in states.items()))
        self._notify("READY=1")

    def reload(self, name: str, path: Path | None = None) -> dict:
        task = f"reloading '{name}'"
        self.progress.begin(task)
        try:
            result = self.registry.reload(name, path)
        except EdgeJitError:
            self.metrics.count_reload(name, "rolled_back")
            raise
        finally:
            self.progress.end(task)
        self.metrics.count_reload(name, result["result"])
        if result["result"] == "swapped":
            self._announce(name)
        return result

    def _announce(self, name: str) -> None:
        slot = self.registry.slot(name)
        if self.telemetry is not None and slot.current is not None:
            self.telemetry.add_model(slot.current.runtime)
            if _generation(slot.current):  # queue, running sequences, KV memory, prefix cache: sampled
                self.telemetry.add_generation_source(slot.current.runtime.name, slot.current.runtime.gauges)

    def reload_all(self) -> None:
        """SIGHUP: every model from its configured artifact path (where the updater flips links)."""
        for name in self.registry.names():
            try:
                self.reload(name, self.configured_artifact(name))
            except EdgeJitError:
                pass  # logged by the registry; the old version keeps serving

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads every model's artifact."""
        self.start()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        while not self._stop.wait(0.5):
            pass
        self.shutdown()
        return 0

    def _on_stop_signal(self, signum, frame) -> None:
        if self._stop.is_set():
            log.warning("second %s: not waiting for in-flight requests", signal.Signals(signum).name)
            self._drain_timeout = 0.0
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stop.set()

    def _on_hup(self, signum, frame) -> None:
        log.info("SIGHUP received: reloading every model")
        threading.Thread(target=self.reload_all, name="edgejit-reload", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests, persist JIT profiles, flush telemetry."""
        self._notify("STOPPING=1")
        self._stop.set()
        self.draining = True  # new requests on open connections: 503
        with self._pending_lock:
            inflight = self._pending
        if inflight:
            log.info("finishing %d in-flight request(s) ...", inflight)
        if self.server is not None:
            self.server.shutdown()  # no more accept()
            self.server.server_close()
        start = time.monotonic()
        with self._idle:
            while self._pending and time.monotonic() < start + self._drain_timeout:
                self._idle.wait(0.2)
            left = self._pending
        if left:
            log.warning("%d request(s) still running after %.0fs; stopping anyway", left, time.monotonic() - start)
        self._pool.shutdown(wait=not left, cancel_futures=True)
        for slot in self.registry.slots():
            spec = slot.current.runtime.specializer if slot.current else None
            if spec is not None:
                spec.persist()
        self.registry.close_all()
        if self.telemetry is not None:
            try:
                self.telemetry.close()
            except Exception:
                log.exception("telemetry shutdown failed")
        self.progress.close()
        log.info("stopped cleanly")

    # -- telemetry ------------------------------------------------------------------------
    def _start_telemetry(self) -> None:
        if not self.cfg.telemetry:
            return
        from edge.telemetry import Publisher, TelemetryConfig

        tel = TelemetryConfig.from_dict(self.cfg.telemetry)
        policy = self._jit.to_dict() if self._jit is not None else {"mode": "none"}
        self.telemetry = Publisher(tel, policy=policy)
        self.telemetry.on_hot_lengths(self._on_fleet_hot_lengths)
        log.info("telemetry: publishing as device '%s' in fleet '%s' to %s:%d",
                 tel.device_id, tel.fleet, tel.broker.host, tel.broker.port)

    def _on_fleet_hot_lengths(self, model: str, lengths: list[int]) -> None:
        """The coordinator's hot lengths for a model (by artifact name): compile them ahead."""
        for slot in self.registry.slots():
            v = slot.current
            if v is not None and not _generation(v) and v.runtime.name == model and v.runtime.specializer is not None:
                spec, art = v.runtime.specializer, v.runtime.artifact
                targets = sorted({spec.policy.target_length(int(n), art.max_seq, spec.padding_safe)
                                  for n in lengths if 1 <= int(n) <= art.max_seq})
                if self._fleet_hot.get(slot.name) != targets:  # log changes, not every update
                    self._fleet_hot[slot.name] = targets
                    jit_log.info("fleet hot lengths for '%s': %s -> variants for %s", slot.name,
                                 ", ".join(map(str, sorted(lengths)[:16])), ", ".join(map(str, targets)) or "none")
                spec.prespecialize(lengths)

    # -- views ----------------------------------------------------------------------------
    def health(self) -> dict:
        states = {s.name: s.state for s in self.registry.slots()}
        if self.draining:
            status = "draining"
        elif not states or any(s == "loading" for s in states.values()):
            status = "loading"
        elif all(s == "ready" for s in states.values()):
            status = "ok"
        elif any(s == "ready" for s in states.values()):
            status = "degraded"
        else:
            status = "failed"
        return {
            "status": status,
            "models": states,
            "in_flight": self._pending,
            "work": self.progress.snapshot(),
            "uptime_s": round(time.time() - self.metrics.started, 1),
        }

    def describe(self, name: str) -> dict:
        slot = self.registry.slot(name)
        doc = {"name": name, "state": slot.state}
        if slot.error:
            doc["error"] = slot.error
        v = slot.current
        doc["kind"] = "decoder" if v is not None and _generation(v) else "tensor"
        if v is not None and _generation(v):
            doc.update(v.describe())
            doc["context"] = v.runtime.context
            doc["generation"] = v.runtime.stats()
            spec = v.runtime.specializer
            if spec is not None:
                doc["jit"] = {"mode": spec.stats()["policy"]["mode"], "ready_batch_sizes": spec.ready_lengths()}
        elif v is not None:
            art = v.runtime.artifact
            doc.update(v.describe())
            doc["inputs"] = [s.to_json() for s in art.inputs]
            doc["outputs"] = [s.to_json() for s in art.outputs]
            doc["seq_dim"], doc["max_seq"] = art.seq_dim, art.max_seq
            spec = v.runtime.specializer
            if spec is not None:
                stats = spec.stats()
                doc["jit"] = {
                    "mode": stats["policy"]["mode"],
                    "ready_lengths": spec.ready_lengths(),
                    "variants": {str(k): {kk: vv for kk, vv in s.items() if vv not in (None, "", 0)} for k, s in stats["variants"].items()},
                }
        if slot.previous:
            doc["previous"] = slot.previous
        return doc

    def openai_model(self, name: str) -> dict:
        """describe() in the shape of OpenAI's model object (id, object, created as a Unix time,
        owned_by); the artifact's creation date moves to `artifact_created`."""
        doc = self.describe(name)
        v = self.registry.slot(name).current
        created = doc.pop("created", None)
        out = {"id": name, "object": "model", "created": int(v.loaded_at if v is not None else self.metrics.started),
               "owned_by": "edgejit", **doc}
        if created is not None:
            out["artifact_created"] = created
        return out

    def _gauges(self):
        slots = self.registry.slots()
        ready = []
        for s in slots:
            v = s.current
            if v is not None and v.runtime.specializer is not None:
                ready.append(((("model", s.name),), len(v.runtime.specializer.ready_lengths())))
        gen = [(s.name, s.current.runtime.stats()) for s in slots if s.current is not None and _generation(s.current)]
        gen_gauges = [(s.name, s.current.runtime.gauges()) for s in slots if s.current is not None and _generation(s.current)]
        return [
            ("edgejit_generation_sequences_running", "sequences being generated (continuous batch)", [((("model", n),), st["running"]) for n, st in gen]),
            ("edgejit_generation_sequences_queued", "generation requests waiting for a sequence slot", [((("model", n),), st["queued"]) for n, st in gen]),
            ("edgejit_generation_kv_tokens_in_use", "tokens held in the KV cache by running sequences", [((("model", n),), st["kv_tokens_in_use"]) for n, st in gen]),
            ("edgejit_generation_kv_bytes", "KV cache memory allocated (running sequences and the prefix cache)", [((("model", n),), st["kv_bytes_total"]) for n, st in gen]),
            ("edgejit_generation_kv_bytes_in_use", "KV cache memory in use (running sequences and, with a prefix cache, retained prefixes)", [((("model", n),), g["kv_bytes"]) for n, g in gen_gauges]),
            ("edgejit_generation_prefix_cache_hits", "prompts that reused a cached prefix (since the model loaded)", [((("model", n),), g["prefix_hits"]) for n, g in gen_gauges if "prefix_hits" in g]),
            ("edgejit_generation_prefix_cache_lookups", "prompts looked up in the prefix cache (since the model loaded)", [((("model", n),), g["prefix_lookups"]) for n, g in gen_gauges if "prefix_lookups" in g]),
            ("edgejit_requests_in_flight", "inference requests admitted and not finished (queued or running)", [((), self._pending)]),
            ("edgejit_connections", "open client connections", [((), self.server.connections if self.server else 0)]),
            ("edgejit_model_ready", "1 if the model is serving", [((("model", s.name),), int(s.state == "ready")) for s in slots]),
            ("edgejit_model_info", "the artifact version each model serves", [
                ((("model", s.name), ("version", s.current.version)), 1) for s in slots if s.current is not None
            ]),
            ("edgejit_jit_variants_ready", "specialized variants loaded and serving", ready),
        ]

    @staticmethod
    def _notify(state: str) -> None:
        """sd_notify for Type=notify units (no-op elsewhere)."""
        addr = os.environ.get("NOTIFY_SOCKET")
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                s.sendall(state.encode())
        except OSError:
            pass
