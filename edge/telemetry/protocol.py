"""Telemetry protocol version 1: topic names and payload builders (spec: docs/telemetry.md).

Shared by the device publisher and the host coordinator, so both agree on every name. The
messages' JSON Schema (schema_v1.json, beside this file) is what the coordinator validates
against (deploy/fleet/coordinator/validate.py).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

PROTOCOL_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name(f"schema_v{PROTOCOL_VERSION}.json")

# Topic kinds a device publishes under <prefix>/<fleet>/<device>/<kind>.
DEVICE_KINDS = ("birth", "death", "metrics", "jit")
# Coordinator topics live under <prefix>/<fleet>/_coordinator/... (device ids never start with "_").
COORD = "_coordinator"

MODULE_KINDS = ("generic", "variant", "padded")
JIT_EVENTS = (
    "compile_started", "compile_finished", "compile_failed",
    "cache_hit", "cache_miss", "evicted", "swapped_in",
)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SEQ = 2**63 - 1  # sequence numbers and session counters are unsigned 63-bit (fit SQLite INTEGER)


def valid_id(name: str) -> bool:
    """Device, fleet and coordinator ids: 1-64 of [A-Za-z0-9_.-], not starting with '_', '.' or '-'."""
    return isinstance(name, str) and bool(_ID.match(name))


def model_topic_level(model: str) -> str:
    """A model name as one topic level (percent-encoded: no '/', '+', '#')."""
    return urllib.parse.quote(model, safe="")


def device_topic(prefix: str, fleet: str, device: str, kind: str) -> str:
    return f"{prefix}/{fleet}/{device}/{kind}"


def coordinator_state_topic(prefix: str, fleet: str, coordinator_id: str) -> str:
    return f"{prefix}/{fleet}/{COORD}/state/{coordinator_id}"


def hot_topic(prefix: str, fleet: str, model: str) -> str:
    return f"{prefix}/{fleet}/{COORD}/hot/{model_topic_level(model)}"


def rebirth_topic(prefix: str, fleet: str, device: str) -> str:
    return f"{prefix}/{fleet}/{COORD}/rebirth/{device}"


def parse_device_topic(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """'<prefix>/<fleet>/<device>/<kind>' -> (fleet, device, kind), or None if it is not one."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) != 3 or parts[2] not in DEVICE_KINDS or not valid_id(parts[0]) or not valid_id(parts[1]):
        return None
    return parts[0], parts[1], parts[2]
