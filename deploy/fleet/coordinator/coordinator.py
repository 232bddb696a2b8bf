"""The coordinator: subscribes to the fleet's device topics, validates, de-duplicates and stores
every message, and publishes its own state (retained, with a Will) and the fleet's hot lengths.

Delivery: a persistent MQTT session (clean_start=False, session expiry) with manual PUBACKs sent
only after the message is committed to SQLite, so a message is either stored or redelivered by the
broker - a coordinator killed or restarted mid-stream loses nothing. With `share_group` set it
subscribes through MQTT 5 shared subscriptions ($share/<group>/...), so several coordinators split
the load; they may share one database file (the store's merge does not depend on order).

Threads: paho's network thread only enqueues; one worker thread stores, acks and publishes.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time


from edge.telemetry import protocol
from edge.telemetry.mqtt import BrokerSettings, TelemetryError, connect_properties, make_client

from deploy.fleet.coordinator import validate
from deploy.fleet.coordinator.store import Store

log = logging.getLogger("edgejit.coordinator")


class Coordinator:
    def __init__(
        self,
        broker: BrokerSettings,
        store: Store,
        *,
        prefix: str = "edgejit",
        fleet: str = "default",
        coordinator_id: str = "coordinator",
        share_group: str | None = None,
        max_payload: int = validate.DEFAULT_MAX_PAYLOAD,
        hot_interval_s: float = 10.0,
        hot_top_k: int = 8,
        hot_min_share: float = 0.05,
        session_expiry_s: int = 7 * 86400,
        rebirth_interval_s: float = 30.0,
        raw_retention_s: float | None = 30 * 86400,
    ):
        if not protocol.valid_id(fleet) or not protocol.valid_id(coordinator_id):
            raise TelemetryError(f"fleet {fleet!r} and coordinator id {coordinator_id!r} must be ids ([A-Za-z0-9_.-])")
        self.broker, self.store, self.prefix, self.fleet = broker, store, prefix, fleet
        self.coordinator_id, self.share_group, self.max_payload = coordinator_id, share_group, max_payload
        self.hot_interval_s, self.hot_top_k, self.hot_min_share = hot_interval_s, hot_top_k, hot_min_share
        self.session_expiry_s, self.rebirth_interval_s = session_expiry_s, rebirth_interval_s
        self.raw_retention_s = raw_retention_s
        self.state_topic = protocol.coordinator_state_topic(prefix, fleet, coordinator_id)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._published_hot: dict[str, list[int]] = {}
        self._rebirth_asked: dict[str, float] = {}
        self._last_fail_log = -1e9
        self.connected = threading.Event()
        self.stats = {"processed": 0, "stored": 0, "duplicate": 0, "rejected": 0, "death": 0, "db_errors": 0}
        # paho's own thread reconnects; the persistent session resumes with what was queued.
        self.client = make_client(broker, f"edgejit-coord-{fleet}-{coordinator_id}", manual_ack=True, reconnect=True,
                                  persistent=True)
        self.client.reconnect_delay_set(0.2, 5)
        q = self._q
        self.client.on_connect = lambda _c, _u, flags, rc, _p: q.put(("connack", rc, flags))
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: q.put(("disconnected", rc))
        self.client.on_connect_fail = lambda _c, _u: q.put(("connect_failed",))
        self.client.on_message = lambda _c, _u, m: q.put(("message", m.topic, m.payload, m.mid, m.qos))
        self.client.will_set(self.state_topic, self._state("offline"), qos=1, retain=True)
        self._worker = threading.Thread(target=self._run, name="edgejit-coordinator", daemon=True)

    def _state(self, state: str) -> bytes:
        return json.dumps({"v": protocol.PROTOCOL_VERSION, "type": "state", "coordinator": self.coordinator_id,
                           "state": state, "ts": time.time()}).encode()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, wait_s: float | None = 10.0) -> "Coordinator":
        kwargs = {}
        if self.broker.protocol == "5":
            kwargs = {"clean_start": False,
                      "properties": connect_properties("5", session_expiry_s=self.session_expiry_s)}
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s, **kwargs)
        self.client.loop_start()
        self._worker.start()
        if wait_s and not self.connected.wait(wait_s):
            log.warning("coordinator: not connected to %s:%s after %.0f s (still trying)",
                        self.broker.host, self.broker.port, wait_s)
        return self

    def stop(self) -> None:
        """Publish the offline state, disconnect cleanly, finish what is queued."""
        self._stop.set()
        self._q.put(("wake",))
        self._worker.join(15)
        if self.client.is_connected():
            try:
                info = self.client.publish(self.state_topic, self._state("offline"), qos=1, retain=True)
                info.wait_for_publish(3)
            except (RuntimeError, ValueError):
                pass  # disconnected meanwhile: the Will says offline instead
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        next_hot = time.monotonic() + self.hot_interval_s
        next_prune = time.monotonic() + 60
        while True:
            try:
                item = self._q.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    self._handle(item)
                except Exception:
                    log.exception("coordinator: failed handling %s", item[0])
            if self._stop.is_set() and self._q.empty():
                return
            if time.monotonic() >= next_hot and self.connected.is_set():
                try:
                    self.publish_hot_lengths()
                except Exception:
                    log.exception("coordinator: hot lengths")
                next_hot = time.monotonic() + self.hot_interval_s
            if self.raw_retention_s and time.monotonic() >= next_prune:
                try:
                    self.store.prune(self.raw_retention_s)
                except Exception:
                    log.exception("coordinator: pruning old raw messages")
                next_prune = time.monotonic() + 3600

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "message":
            _, topic, payload, mid, qos = item
            try:
                self._ingest(topic, payload)
            except sqlite3.Error:
                # not the message's fault: leave it unacknowledged, the broker redelivers it
                self.stats["db_errors"] += 1
                log.exception("coordinator: database error; message on %s left for redelivery", topic[:200])
                return
            if qos > 0:
                self.client.ack(mid, qos)  # only now: the message is committed
        elif kind == "connack":
            rc = item[1]
            if rc.is_failure:
                log.error("coordinator: broker refused the connection: %s", rc)
                return
            self._subscribe()
            self.client.publish(self.state_topic, self._state("online"), qos=1, retain=True)
            self._published_hot.clear()  # republish on the next tick
            self.connected.set()
            log.info("coordinator %s online (session present: %s)", self.coordinator_id, item[2].session_present)
        elif kind == "connect_failed":
            now = time.monotonic()
            if now - self._last_fail_log > 30:
                self._last_fail_log = now
                log.warning("coordinator: cannot reach the broker at %s:%s; retrying", self.broker.host, self.broker.port)
        elif kind == "disconnected":
            self.connected.clear()
            log.warning("coordinator: disconnected (%s); reconnecting", item[1])

    def _subscribe(self) -> None:
        share = f"$share/{self.share_group}/" if self.share_group else ""
        self.client.subscribe(
            [(f"{share}{protocol.device_topic(self.prefix, self.fleet, '+', k)}", 1) for k in protocol.DEVICE_KINDS]
        )

    def _ingest(self, topic: str, payload: bytes) -> str:
        self.stats["processed"] += 1
        try:
            msg = validate.parse(self.prefix, topic, payload, self.max_payload)
            result = self.store.ingest(msg)
        except validate.Rejected as e:
            self._reject(topic, e.reason, e.detail, len(payload))
            return "rejected"
        except sqlite3.Error:
            raise
        except Exception as e:  # a bug or a message that trips one: count it, keep running
            log.exception("coordinator: error storing a message from %s", topic[:200])
            self._reject(topic, "error", f"{type(e).__name__}: {e}", len(payload))
            return "rejected"
        self.stats[result] += 1
        if msg.kind in ("metrics", "jit") and not self.store.known_birth(msg.fleet, msg.device):
            self._ask_rebirth(msg.device)
        return result

    def _reject(self, topic: str, reason: str, detail: str, size: int) -> None:
        self.stats["rejected"] += 1
        log.warning("coordinator: rejected message on %s: %s: %s", topic[:200], reason, detail)
        self.store.reject(topic, reason, detail, size)

    def _ask_rebirth(self, device: str) -> None:
        now = time.monotonic()
        if now - self._rebirth_asked.get(device, -1e9) < self.rebirth_interval_s:
            return
        self._rebirth_asked[device] = now
        self.request_rebirth(device)

    def request_rebirth(self, device: str) -> None:
        self.client.publish(protocol.rebirth_topic(self.prefix, self.fleet, device),
                            json.dumps({"v": protocol.PROTOCOL_VERSION, "type": "rebirth"}), qos=1)

    def publish_hot_lengths(self) -> dict[str, list[int]]:
        """Publish (retained) each model's hot lengths that changed since the last publish."""
        hot = self.store.hot_lengths(top_k=self.hot_top_k, min_share=self.hot_min_share)
        for model, lengths in hot.items():
            if self._published_hot.get(model) != lengths and lengths:
                body = {"v": protocol.PROTOCOL_VERSION, "type": "hot", "model": model, "lengths": lengths, "ts": time.time()}
                self.client.publish(protocol.hot_topic(self.prefix, self.fleet, model), json.dumps(body), qos=1, retain=True)
                self._published_hot[model] = lengths
        return hot

