"""Test helpers for fleet telemetry: a real Mosquitto with auth + per-device ACL on a free
loopback port (deploy/fleet/broker.py), device/coordinator settings for it, and polling."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploy.fleet.broker import Broker, find_mosquitto
from edge.telemetry import BrokerSettings

FLEET = "f1"
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
PASSWORDS = {"coordinator": "coord-secret", **{d: f"{d}-secret" for d in DEVICES}}
WINDOW_S = 0.2  # telemetry windows in tests (production default: 10 s)

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")


def start_broker(directory: Path) -> Broker:
    return Broker(directory, users=PASSWORDS, coordinators=["coordinator"])


def coordinator_settings(broker: Broker) -> BrokerSettings:
    return BrokerSettings(host=broker.host, port=broker.port, username="coordinator", password=PASSWORDS["coordinator"])


def device_config(broker: Broker, device: str, spool_dir: Path, *, login: str | None = None, **overrides) -> dict:
    """Publisher config for `device`, logging in as `login` (default: itself)."""
    login = login or device
    cfg = {
        "host": broker.host, "port": broker.port, "username": login, "password": PASSWORDS[login],
        "fleet": FLEET, "device_id": device, "window_s": WINDOW_S,
        "spool_path": str(Path(spool_dir) / f"{device}-spool.sqlite"),
        "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive_s": 5,
    }
    cfg.update(overrides)
    return cfg


def wait_for(condition, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
