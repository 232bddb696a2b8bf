"""Check one incoming MQTT message against protocol version 1 (schema_v1.json + topic + sketches).

Returns a parsed message or raises Rejected with a reason the coordinator counts:
`oversized`, `malformed` (not UTF-8 JSON), `schema` (valid JSON, wrong shape or version),
`mismatch` (payload names another device/fleet than its topic), `topic` (not a device topic).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import fastjsonschema

from edge.telemetry import protocol, sketch

SCHEMA_PATH = protocol.SCHEMA_PATH
DEFAULT_MAX_PAYLOAD = 256 * 1024
REASONS = ("oversized", "malformed", "schema", "mismatch", "topic", "error")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Message:
    fleet: str
    device: str
    kind: str
    body: dict
    payload: str  # the JSON text as received
    sketches: tuple = ()  # metrics: the decoded sketch of each series, in order

    @property
    def session(self) -> int:
        return self.body["session"]

    @property
    def seq(self) -> int | None:
        return self.body.get("seq")


@functools.lru_cache(maxsize=1)
def _validators() -> dict:
    """One compiled validator per message kind (fastjsonschema turns our own schema file into
    Python code once; ~25x faster than interpreting it per message)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    return {k: fastjsonschema.compile({**schema, "$ref": f"#/$defs/{k}"}) for k in protocol.DEVICE_KINDS}


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(prefix: str, topic: str, payload: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Message:
    if len(payload) > max_payload:
        raise Rejected("oversized", f"{len(payload)} bytes > {max_payload}")
    where = protocol.parse_device_topic(prefix, topic)
    if where is None:
        raise Rejected("topic", f"not a device topic: {topic[:200]!r}")
    fleet, device, kind = where
    try:
        text = payload.decode("utf-8")
        body = json.loads(text, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Rejected("malformed", f"not JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise Rejected("schema", "payload is not a JSON object")
    try:
        _validators()[kind](body)
    except fastjsonschema.JsonSchemaValueException as e:
        raise Rejected("schema", f"{kind}: {e.message[:200]}") from None
    if body["type"] != kind:
        raise Rejected("schema", f"type {body['type']!r} on a {kind} topic")
    if body["device"] != device or body["fleet"] != fleet:
        raise Rejected("mismatch", f"payload says {body['fleet']}/{body['device']}, topic {fleet}/{device}")
    sketches = []
    if kind == "metrics":
        for s in body["series"]:
            try:
                sk = sketch.decode(s["sketch"])
            except sketch.SketchError as e:
                raise Rejected("schema", f"series {s['model']}/{s['seq_len']}: {e}") from None
            if abs(sk.count - s["count"]) > 1e-6 or not all(math.isfinite(s[k]) for k in ("sum_ms", "min_ms", "max_ms")):
                raise Rejected("schema", f"series {s['model']}/{s['seq_len']}: count {s['count']} != sketch count {sk.count}")
            sketches.append(sk)
        for g in body.get("generation", ()):
            for name, d in g.items():
                if isinstance(d, dict) and "sketch" in d:
                    try:
                        sk = sketch.decode(d["sketch"])
                    except sketch.SketchError as e:
                        raise Rejected("schema", f"generation {g['model']}/{name}: {e}") from None
                    if abs(sk.count - d["count"]) > 1e-6 or not all(math.isfinite(d[k]) for k in ("sum", "min", "max")):
                        raise Rejected("schema", f"generation {g['model']}/{name}: count {d['count']} != sketch count {sk.count}")
    return Message(fleet, device, kind, body, text, tuple(sketches))
