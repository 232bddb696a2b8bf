"""`edgejit coordinator`: subscribe to a fleet's telemetry and store it (runs until stopped)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

from edge.telemetry.mqtt import BROKER_KEYS, BrokerSettings, TelemetryError
from edge.telemetry.protocol import valid_id

from deploy.fleet.coordinator.coordinator import Coordinator
from deploy.fleet.coordinator.store import Store

OWN_KEYS = ("fleet", "prefix", "db", "id", "share_group", "hot_interval_s", "max_payload", "rollup_s", "raw_retention_s")


def add_arguments(p) -> None:
    p.add_argument("--config", help="JSON file: broker settings (host, port, username, password_file, tls, protocol) "
                                    "and coordinator settings (fleet, prefix, db, id, share_group, ...)")
    p.add_argument("--host", help="broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="broker port (default 1883)")
    p.add_argument("--username")
    p.add_argument("--password-file", help="file holding the MQTT password")
    p.add_argument("--fleet", help="fleet id (default 'default')")
    p.add_argument("--db", help="SQLite database (default fleet.sqlite)")
    p.add_argument("--id", help="coordinator id (default 'coordinator')")
    p.add_argument("--share-group", help="subscribe via $share/<group>/... to split the load with other coordinators")


def load_config(args) -> dict:
    cfg = {}
    if args.config:
        try:
            cfg = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise TelemetryError(f"{args.config}: cannot read coordinator config: {e}") from None
        if not isinstance(cfg, dict):
            raise TelemetryError(f"{args.config}: must be a JSON object")
        unknown = set(cfg) - set(BROKER_KEYS) - set(OWN_KEYS)
        if unknown:
            raise TelemetryError(f"{args.config}: unknown keys {sorted(unknown)}")
    for key in ("host", "port", "username", "password_file", "fleet", "db", "id", "share_group"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    return cfg


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args)
    for key, default in (("fleet", "default"), ("id", "coordinator")):
        if not valid_id(cfg.get(key, default)):
            raise TelemetryError(f"{key} {cfg[key]!r} must be 1-64 of [A-Za-z0-9_.-], not starting with _ . -")
    settings = BrokerSettings.from_dict(cfg, args.config or "coordinator settings")
    store = Store(cfg.get("db", "fleet.sqlite"), rollup_s=cfg.get("rollup_s"))
    coord = Coordinator(
        settings, store,
        prefix=cfg.get("prefix", "edgejit"), fleet=cfg.get("fleet", "default"),
        coordinator_id=cfg.get("id", "coordinator"), share_group=cfg.get("share_group"),
        **{k: cfg[k] for k in ("hot_interval_s", "max_payload", "raw_retention_s") if k in cfg},
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    coord.start(wait_s=None)
    print(f"coordinator {coord.coordinator_id}: fleet {coord.fleet} from {coord.broker.host}:{coord.broker.port} "
          f"into {store.path} (Ctrl-C to stop)", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        coord.stop()
        store.close()
    return 0
