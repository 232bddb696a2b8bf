"""Device telemetry settings, read from a JSON object (e.g. the daemon config's "telemetry")."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from edge.telemetry.mqtt import BROKER_KEYS, BrokerSettings, TelemetryError
from edge.telemetry.protocol import valid_id


def default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].lstrip("_.-")
    return name or "device"


@dataclass
class TelemetryConfig:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    fleet: str = "default"
    device_id: str = field(default_factory=default_device_id)
    prefix: str = "edgejit"
    window_s: float = 10.0
    sample_s: float = 1.0  # how often text-generation gauges (queue, running sequences, KV) are sampled
    spool_path: str = "~/.cache/edgejit/telemetry-spool.sqlite"
    spool_max_windows: int = 10_000
    spool_max_bytes: int = 64 << 20
    spool_max_age_s: float = 7 * 86400
    max_inflight: int = 20
    max_events_per_window: int = 1000
    max_message_bytes: int = 128 * 1024  # larger windows are split (the coordinator accepts 256 KiB)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "telemetry config") -> "TelemetryConfig":
        if not isinstance(d, dict):
            raise TelemetryError(f"{where}: must be a JSON object")
        own = {f.name for f in fields(cls)} - {"broker"}
        unknown = set(d) - own - set(BROKER_KEYS)
        if unknown:
            raise TelemetryError(f"{where}: unknown keys {sorted(unknown)}")
        cfg = cls(broker=BrokerSettings.from_dict(d, where), **{k: d[k] for k in own if k in d})
        for name in ("fleet", "device_id"):
            if not valid_id(getattr(cfg, name)):
                raise TelemetryError(f"{where}: {name} {getattr(cfg, name)!r} must be 1-64 of [A-Za-z0-9_.-], not starting with _ . -")
        if not cfg.prefix or any(c in cfg.prefix for c in "+#") or cfg.prefix.startswith("$") or cfg.prefix.endswith("/"):
            raise TelemetryError(f"{where}: prefix {cfg.prefix!r} must be a plain topic path")
        if not cfg.window_s > 0 or not cfg.sample_s > 0 or cfg.max_inflight < 1 or cfg.spool_max_windows < 1:
            raise TelemetryError(f"{where}: window_s, sample_s, max_inflight and spool_max_windows must be positive")
        if cfg.max_message_bytes < 8192:
            raise TelemetryError(f"{where}: max_message_bytes must be at least 8192")
        return cfg

    @property
    def spool_file(self) -> Path:
        return Path(self.spool_path).expanduser()
