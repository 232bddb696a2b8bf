"""The device-side telemetry publisher: a runtime listener that batches what the runtime observes
into windows and publishes them over MQTT (protocol: docs/telemetry.md).

    pub = Publisher(TelemetryConfig.from_dict(cfg), models=[runtime.artifact], policy=policy_dict)
    runtime = edge.Runtime(artifact, listeners=[pub])      # or runtime.add_listener(pub)
    pub.on_hot_lengths(lambda model, lengths: ...)          # fleet feedback for the JIT
    pub.on_generation(model, stats)                         # a text-generation request ended
    pub.add_generation_source(model, engine_gauges)         # sampled every sample_s: queue, KV, ...
    ...
    pub.close()                                             # last window, explicit death

Threads: `on_request`/`on_jit` (called by inference threads) and the paho callbacks only put a
tuple on a queue. One worker thread owns everything else: the paho client (it drives the network
loop itself), the sketches of the open window, the SQLite spool, reconnects and the hot-length
callbacks. Inference never waits on the network, the disk or a lock held by them.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import queue
import sqlite3
import threading
import time
from importlib import metadata

import paho.mqtt.client as mqtt

from edge import machine
from edge.telemetry import protocol, sketch
from edge.telemetry.config import TelemetryConfig
from edge.telemetry.mqtt import TelemetryError, connect_properties, make_client
from edge.telemetry.spool import Spool

log = logging.getLogger("edgejit.telemetry")

_MAX_HOT = 64


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def model_info(obj) -> dict:
    """Birth entry for a loaded model: an edge.artifact.Artifact or anything with `.artifact`."""
    art = getattr(obj, "artifact", obj)
    return {
        "name": art.name,
        "sha256": art.model_sha256,
        "precision": art.precision,
        "target": art.manifest.target.to_json(),
    }


class _Series:
    __slots__ = ("sketch", "count", "sum", "min", "max")

    def __init__(self):
        self.sketch, self.count, self.sum, self.min, self.max = sketch.new(), 0, 0.0, float("inf"), 0.0

    def add(self, ms: float) -> None:
        self.sketch.add(ms)
        self.count += 1
        self.sum += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)


# Distributions of a text-generation model, per window (docs/telemetry.md, "generation"):
# per finished request: time to first token, mean inter-token latency, decode tokens/s;
# sampled every sample_s: requests waiting, sequences running, KV cache bytes in use.
GEN_REQUEST = ("ttft_ms", "itl_ms", "tok_s")
GEN_SAMPLED = ("queued", "running", "kv_bytes")
_GEN_COUNTERS = ("prefix_hits", "prefix_lookups")  # cumulative in the source; per-window deltas on the wire


class _Generation:
    """One model's generation window: distributions, token counts, finish reasons."""

    def __init__(self):
        self.dists = {k: _Series() for k in GEN_REQUEST + GEN_SAMPLED}
        self.requests, self.prompt_tokens, self.completion_tokens = 0, 0, 0
        self.finish: dict[str, int] = {}
        self.counters = dict.fromkeys(_GEN_COUNTERS, 0)
        self.has_counters = False

    def add_request(self, prompt_tokens: int, completion_tokens: int, finish: str, ttft_s, decode_s) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.finish[finish] = self.finish.get(finish, 0) + 1
        if completion_tokens >= 1 and ttft_s is not None and 0 <= ttft_s < 1e6:
            self.dists["ttft_ms"].add(ttft_s * 1000.0)
        if completion_tokens >= 2 and decode_s and 0 < decode_s < 1e6:
            self.dists["itl_ms"].add(decode_s * 1000.0 / (completion_tokens - 1))
            self.dists["tok_s"].add((completion_tokens - 1) / decode_s)

    def to_json(self, model: str) -> dict:
        out = {"model": model, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens, "finish": dict(self.finish)}
        for k, d in self.dists.items():
            if d.count:
                out[k] = {"count": d.count, "sum": d.sum, "min": d.min, "max": d.max, "sketch": sketch.encode(d.sketch)}
        if self.has_counters:
            out.update(self.counters)
        return out


class Publisher:
    def __init__(self, config: TelemetryConfig | dict, *, models=(), policy: dict | None = None, start: bool = True):
        self.config = config if isinstance(config, TelemetryConfig) else TelemetryConfig.from_dict(config)
        c = self.config
        try:
            self.spool = Spool(c.spool_file, max_windows=c.spool_max_windows, max_bytes=c.spool_max_bytes,
                               max_age_s=c.spool_max_age_s)
        except (sqlite3.Error, OSError) as e:
            raise TelemetryError(f"telemetry spool {c.spool_file}: {e}") from None
        self.client_id = f"edgejit-{c.fleet}-{c.device_id}"
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._models = {m["name"]: m for m in map(model_info, models)}
        self._policy = dict(policy or {})
        self._hot_callbacks: list = []
        self.hot_lengths: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._close_timeout = 5.0
        # worker-thread state
        self._client: mqtt.Client | None = None
        self._connected = False
        self._session = None  # session of the live connection
        self._pending_session = None  # the session the connection being set up will get
        self._next_attempt = 0.0
        self._backoff = c.reconnect_min_s
        self._inflight: dict[int, int] = {}  # paho mid -> spool window id
        self._sent_upto = 0
        self._series: dict[tuple, _Series] = {}
        self._events: list[dict] = []
        self._events_dropped = 0
        self._generation: dict[str, _Generation] = {}
        self._gen_sources: dict[str, object] = {}  # model -> callable returning the engine's gauges
        self._gen_last: dict[str, dict] = {}  # model -> the source's cumulative counters at the last sample
        self._next_sample = 0.0
        self._window_start = time.time()
        self.counters = {"requests": 0, "windows": 0, "published": 0, "acked": 0, "connects": 0, "births": 0}
        self._thread = threading.Thread(target=self._run, name="edgejit-telemetry", daemon=True)
        if start:
            self._thread.start()

    # -- runtime listener interface (never blocks) ----------------------------------------
    def on_request(self, model_name: str, seq_len: int | None, module_kind: str, latency_s: float) -> None:
        self._q.put(("request", model_name, seq_len, module_kind, latency_s))

    def on_jit(self, model_name: str, event: dict) -> None:
        self._q.put(("jit", model_name, time.time(), dict(event)))

    def on_generation(self, model_name: str, stats) -> None:
        """A text-generation request ended; `stats` has prompt_tokens, completion_tokens, ttft_s
        (submit -> first token), decode_s (first -> last token) and finish_reason
        (edge.generate.engine.GenerationStats)."""
        self._q.put(("generation", model_name, int(stats.prompt_tokens), int(stats.completion_tokens),
                     str(stats.finish_reason or "unknown"), stats.ttft_s, stats.decode_s))

    def add_generation_source(self, model_name: str, sample) -> None:
        """Sample `sample()` every `sample_s` from the telemetry thread (replacing the model's earlier
        source): a dict with queued, running, kv_bytes (gauges) and, when the engine has a prefix
        cache, prefix_hits and prefix_lookups (cumulative counts; a drop means a new engine).
        Keep it cheap: it runs on the telemetry thread."""
        self._q.put(("gen_source", model_name, sample))

    # -- device API ------------------------------------------------------------------------
    def on_hot_lengths(self, callback) -> None:
        """Register callback(model_name, lengths: list[int]), called from the telemetry thread
        whenever the coordinator's retained hot lengths for a model arrive or change (including
        at once with those already known). Keep it short: enqueue work, don't compile in it."""
        self._q.put(("hot_callback", callback))

    def add_model(self, model) -> None:
        """Announce a newly loaded model (Artifact or Runtime); re-sends the birth."""
        self._q.put(("model", model_info(model)))

    def set_policy(self, policy: dict) -> None:
        self._q.put(("policy", dict(policy)))

    def flush(self, timeout: float = 5.0) -> bool:
        """Close the open window now and wait until it is spooled (not necessarily acknowledged)."""
        done = threading.Event()
        self._q.put(("flush", done))
        return done.wait(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the spool is empty (everything acknowledged) and connected; for tests/shutdown."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._connected and self.spool.stats()["pending"] == 0:
                return True
            time.sleep(0.02)
        return False

    @property
    def connected(self) -> bool:
        return self._connected

    def status(self) -> dict:
        session, next_seq = self.spool.session()
        return {
            "device": self.config.device_id, "fleet": self.config.fleet, "connected": self._connected,
            "session": session, "next_seq": next_seq, "spool": self.spool.stats(), **self.counters,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Close the last window, try for `timeout` s to publish what is spooled, publish the death
        explicitly and disconnect. Unsent windows stay in the spool for the next start."""
        if not self._thread.is_alive():
            if not self._stopped.is_set():
                self.spool.close()
                self._stopped.set()
            return
        self._close_timeout = timeout
        self._stop.set()
        self._q.put(("wake",))
        self._thread.join(timeout + 5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._loop()
                except Exception:  # telemetry must never take the device down (e.g. disk full)
                    log.exception("telemetry worker failed; restarting it in 1 s")
                    if self._client is not None:
                        self._lost(self._client, "worker error")
                    self._stop.wait(1.0)
        finally:
            self._shutdown()

    def _loop(self) -> None:
        c = self.config
        next_window = time.monotonic() + c.window_s
        while not self._stop.is_set():
            now = time.monotonic()
            if self._client is None and now >= self._next_attempt:
                self._connect()
            if self._client is not None:
                rc = self._client.loop(timeout=0.02)
                if rc != mqtt.MQTT_ERR_SUCCESS and self._client is not None:
                    self._lost(self._client, f"network loop: {mqtt.error_string(rc)}")
            self._drain(block=self._client is None)
            if self._gen_sources and time.monotonic() >= self._next_sample:
                self._sample_generation()
                self._next_sample = time.monotonic() + c.sample_s
            if time.monotonic() >= next_window:
                self._close_window()
                next_window = time.monotonic() + c.window_s
            self._send_pending()

    def _drain(self, block: bool) -> None:
        try:
            item = self._q.get(timeout=0.05) if block else self._q.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "request":
            _, model, seq_len, module_kind, latency_s = item
            if not (0.0 <= latency_s < 1e9):  # NaN or nonsense: not a latency
                return
            key = (str(model)[:256], _length(seq_len), _kind(module_kind))
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = _Series()
            s.add(latency_s * 1000.0)
            self.counters["requests"] += 1
        elif kind == "jit":
            _, model, t, event = item
            if len(self._events) >= self.config.max_events_per_window:
                self._events_dropped += 1
            else:
                self._events.append(_jit_event(model, t, event))
        elif kind == "generation":
            _, model, prompt_tokens, completion_tokens, finish, ttft_s, decode_s = item
            finish = finish if _NAME.match(finish) else "unknown"
            self._gen(model).add_request(prompt_tokens, completion_tokens, finish[:32], ttft_s, decode_s)
        elif kind == "gen_source":
            self._gen_sources[str(item[1])[:256]] = item[2]
            self._gen_last.pop(str(item[1])[:256], None)
            self._next_sample = 0.0
        elif kind == "connack":
            self._on_connack(*item[1:])
        elif kind == "disconnected":
            if item[1] is self._client:
                self._lost(item[1], f"disconnected: {item[2]}")
        elif kind == "puback":
            self._on_puback(*item[1:])
        elif kind == "message":
            self._on_message(*item[1:])
        elif kind == "hot_callback":
            self._hot_callbacks.append(item[1])
            for model, lengths in self.hot_lengths.items():
                self._call_hot(item[1], model, lengths)
        elif kind == "model":
            self._models[item[1]["name"]] = item[1]
            self._publish_birth()
        elif kind == "policy":
            self._policy = item[1]
            self._publish_birth()
        elif kind == "flush":
            self._close_window()
            item[1].set()

    def _gen(self, model) -> _Generation:
        model = str(model)[:256]
        g = self._generation.get(model)
        if g is None:
            g = self._generation[model] = _Generation()
        return g

    def _sample_generation(self) -> None:
        for model, sample in list(self._gen_sources.items()):
            try:
                values = sample()
            except Exception:
                log.exception("telemetry: sampling the generation gauges of '%s' failed", model)
                continue
            g = self._gen(model)
            for k in GEN_SAMPLED:
                v = values.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e15:
                    g.dists[k].add(float(v))
            last = self._gen_last.setdefault(model, dict.fromkeys(_GEN_COUNTERS, 0))
            for k in _GEN_COUNTERS:
                v = values.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    g.has_counters = True
                    g.counters[k] += v - last[k] if v >= last[k] else v  # a smaller count: a new engine
                    last[k] = v

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> None:
        c = self.config
        session = self.spool.session()[0] + 1  # the session this connection will be, if accepted
        client = make_client(c.broker, self.client_id)
        q = self._q
        client.on_connect = lambda cl, _u, _f, rc, _p: q.put(("connack", cl, rc))
        client.on_disconnect = lambda cl, _u, _f, rc, _p: q.put(("disconnected", cl, rc))
        client.on_publish = lambda cl, _u, mid, rc, _p: q.put(("puback", cl, mid, rc))
        client.on_message = lambda cl, _u, msg: q.put(("message", cl, msg.topic, msg.payload, msg.retain))
        client.max_inflight_messages_set(c.max_inflight)
        client.will_set(self._topic("death"), self._death(session, clean=False), qos=1, retain=False)
        kwargs = {"clean_start": True, "properties": connect_properties(c.broker.protocol)} if c.broker.protocol == "5" else {}
        try:
            client.connect(c.broker.host, c.broker.port, keepalive=c.broker.keepalive_s, **kwargs)
        except (OSError, ValueError) as e:
            self._retry_later(f"cannot connect to {c.broker.host}:{c.broker.port}: {e}")
            return
        self._client = client
        self._pending_session = session

    def _retry_later(self, why: str) -> None:
        log.info("telemetry: %s; retrying in %.1f s", why, self._backoff)
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.config.reconnect_max_s)

    def _lost(self, client, why: str) -> None:
        if client is not self._client:
            return
        try:
            client.disconnect()
        except Exception:
            pass
        self._client, self._connected, self._session = None, False, None
        self._inflight.clear()
        self._sent_upto = 0
        self._retry_later(why)

    def _on_connack(self, client, rc) -> None:
        if client is not self._client:
            return
        if rc.is_failure:
            self._lost(client, f"broker refused the connection: {rc}")
            if rc.value in (0x86, 0x87, 4, 5):  # bad credentials / not authorized: don't hammer
                self._next_attempt = time.monotonic() + self.config.reconnect_max_s
            return
        session = self.spool.new_session()
        if session != self._pending_session:
            log.warning("telemetry: session counter moved during connect (%s -> %s)", self._pending_session, session)
        self._session, self._connected = session, True
        self._backoff = self.config.reconnect_min_s
        self.counters["connects"] += 1
        p, f, d = self.config.prefix, self.config.fleet, self.config.device_id
        client.subscribe([
            (f"{p}/{f}/{protocol.COORD}/state/+", 1),
            (f"{p}/{f}/{protocol.COORD}/hot/+", 1),
            (protocol.rebirth_topic(p, f, d), 1),
        ])
        self._publish_birth()

    # -- publishing -----------------------------------------------------------------------------
    def _topic(self, kind: str) -> str:
        return protocol.device_topic(self.config.prefix, self.config.fleet, self.config.device_id, kind)

    def _header(self, kind: str, session: int, seq: int | None) -> dict:
        h = {"v": protocol.PROTOCOL_VERSION, "type": kind, "fleet": self.config.fleet, "device": self.config.device_id,
             "session": session}
        if seq is not None:
            h["seq"] = seq
        return h

    def _death(self, session: int, *, clean: bool) -> bytes:
        return _dumps({**self._header("death", session, None), "ts": time.time(), "clean": clean})

    def _publish_birth(self) -> None:
        if not self._connected:
            return  # a birth goes out on the next connect anyway
        session, seq = self.spool.take_seq()
        body = {
            **self._header("birth", session, seq),
            "ts": time.time(),
            "host": {
                "arch": machine.arch(), "cores": machine.cores(), "cpu_features": sorted(machine.cpu_features()),
                "os": platform.platform(), "python": platform.python_version(),
            },
            "versions": {"edgejit": _version("edgejit"), "tvm": _version("apache-tvm"), "tvm_ffi": _version("apache-tvm-ffi")},
            "models": list(self._models.values()),
            "policy": self._policy,
            "window_s": self.config.window_s,
            "sketch": {"type": "ddsketch", "relative_accuracy": sketch.RELATIVE_ACCURACY, "unit": "ms"},
        }
        self._client.publish(self._topic("birth"), _dumps(body), qos=1)
        self.counters["births"] += 1

    def _close_window(self) -> None:
        """Spool the open window: one metrics message (several if it would exceed
        max_message_bytes) and, if there were JIT events, one or more jit messages."""
        now = time.time()
        series = [
            {"model": m, "seq_len": n, "kind": k, "count": s.count, "sum_ms": s.sum, "min_ms": s.min, "max_ms": s.max,
             "sketch": sketch.encode(s.sketch)}
            for (m, n, k), s in sorted(self._series.items())
        ]
        if self._gen_sources:
            self._sample_generation()  # every window has at least one sample of the gauges
            self._next_sample = time.monotonic() + self.config.sample_s
        generation = [g.to_json(m) for m, g in sorted(self._generation.items())]
        t0, events, dropped = self._window_start, self._events, self._events_dropped
        self._series, self._events, self._events_dropped, self._window_start = {}, [], 0, now
        self._generation = {}
        stats = self.spool.stats()
        spool_info = {k: stats[k] for k in ("pending", "dropped_size", "dropped_age", "dropped_refused")}
        in_flight = set(self._inflight.values())
        limit = self.config.max_message_bytes
        for i, part in enumerate(_chunks(series, limit - sum(len(_dumps(g)) for g in generation))):
            extra = {"generation": generation} if i == 0 and generation else {}
            self.spool.append("metrics", lambda session, seq: _dumps(
                {**self._header("metrics", session, seq), "t0": t0, "t1": now, "series": part, "spool": spool_info, **extra}),
                in_flight=in_flight)
            self.counters["windows"] += 1
        if events or dropped:
            for i, part in enumerate(_chunks(events, limit)):
                self.spool.append("jit", lambda session, seq: _dumps(
                    {**self._header("jit", session, seq), "t0": t0, "t1": now, "events": part,
                     "events_dropped": dropped if i == 0 else 0}),
                    in_flight=in_flight)
                self.counters["windows"] += 1

    def _send_pending(self) -> None:
        if not self._connected:
            return
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for w in self.spool.pending(after_id=self._sent_upto, limit=room):
            payload = w.payload
            if w.session != self._session:  # made before this connection: flushed as historical
                payload = b'{"historical":true,' + payload[1:]
            info = self._client.publish(self._topic(w.kind), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._lost(self._client, f"publish failed: {mqtt.error_string(info.rc)}")
                return
            self._inflight[info.mid] = w.id
            self._sent_upto = w.id
            self.counters["published"] += 1

    def _on_puback(self, client, mid, rc) -> None:
        if client is not self._client:
            return
        window_id = self._inflight.pop(mid, None)
        if window_id is None:
            return  # a birth or death
        if rc.is_failure:
            log.warning("telemetry: broker refused window (%s); dropped", rc)
            self.spool.drop(window_id, "refused")
        else:
            self.spool.ack(window_id)
            self.counters["acked"] += 1

    def _on_message(self, client, topic: str, payload: bytes, retained: bool) -> None:
        p, f = self.config.prefix, self.config.fleet
        base = f"{p}/{f}/{protocol.COORD}/"
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict) or body.get("v") != protocol.PROTOCOL_VERSION:
            return
        if topic.startswith(base + "hot/"):
            model, lengths = body.get("model"), body.get("lengths")
            if not isinstance(model, str) or not isinstance(lengths, list):
                return
            lengths = [n for n in lengths if isinstance(n, int) and not isinstance(n, bool) and n > 0][:_MAX_HOT]
            if self.hot_lengths.get(model) == lengths:
                return
            self.hot_lengths[model] = lengths
            for cb in self._hot_callbacks:
                self._call_hot(cb, model, lengths)
        elif topic == protocol.rebirth_topic(p, f, self.config.device_id):
            self._publish_birth()
        elif topic.startswith(base + "state/") and body.get("state") == "online" and not retained:
            self._publish_birth()  # a coordinator (re)started: tell it who we are

    @staticmethod
    def _call_hot(cb, model: str, lengths: list[int]) -> None:
        try:
            cb(model, list(lengths))
        except Exception:
            log.exception("telemetry: hot-lengths callback failed")

    # -- shutdown -----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        try:
            self._drain(block=False)
            self._close_window()
            end = time.monotonic() + self._close_timeout
            while self._client is not None and time.monotonic() < end:
                self._send_pending()
                if self._connected and not self._inflight and not self.spool.pending(after_id=self._sent_upto, limit=1):
                    break
                if self._client is not None and self._client.loop(timeout=0.02) != mqtt.MQTT_ERR_SUCCESS:
                    self._lost(self._client, "connection lost during shutdown")
                self._drain(block=False)
            if self._connected:
                info = self._client.publish(self._topic("death"), self._death(self._session, clean=True), qos=1)
                while not info.is_published() and time.monotonic() < end + 1.0 and self._client is not None:
                    self._client.loop(timeout=0.02)
                self._client.disconnect()
                self._client.loop(timeout=0.05)
        except Exception:
            log.exception("telemetry: error during shutdown")
        finally:
            self._connected = False
            self.spool.close()
            self._stopped.set()


def _length(n) -> int:
    """A sequence length for the wire: a non-negative int, 0 when unknown or absurd."""
    try:
        n = int(n or 0)
    except (TypeError, ValueError):
        return 0
    return n if 0 <= n <= 1 << 20 else 0


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _kind(name) -> str:
    name = str(name)
    return name[:32] if _NAME.match(name) else "unknown"


def _jit_event(model: str, t: float, event: dict) -> dict:
    name = str(event.get("event"))
    out = {"model": str(model)[:256], "event": name[:64] if _NAME.match(name) else "unknown", "t": max(t, 0.0)}
    for src, dst in (("seq", "seq_len"), ("bucket", "bucket")):
        v = event.get(src)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and _length(v):
            out[dst] = _length(v)
    v = event.get("duration_s")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9:
        out["duration_s"] = float(v)
    if event.get("error") is not None:
        out["error"] = str(event["error"])[:500]
    return out


def _chunks(items: list[dict], limit: int):
    """Split items so each part's JSON stays under `limit` bytes (with ~1 KiB for the header);
    always at least one part, possibly empty."""
    part, size = [], 0
    for item in items:
        n = len(_dumps(item)) + 1
        if part and size + n > limit - 1024:
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    yield part


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
