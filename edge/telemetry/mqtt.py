"""Broker connection settings and paho client construction, shared by devices and the coordinator.

paho-mqtt 2.x with CallbackAPIVersion.VERSION2, MQTT v5 unless configured otherwise; TLS and
username/password come from the settings (the password preferably from a file).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.errors import EdgeJitError

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class TelemetryError(EdgeJitError):
    """Telemetry is misconfigured (bad broker settings, ids, TLS files)."""


BROKER_KEYS = ("host", "port", "username", "password", "password_file", "tls", "protocol", "keepalive_s")


@dataclass
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls: dict | None = None  # {"ca_file", "cert_file", "key_file", "insecure": false}
    protocol: str = "5"
    keepalive_s: int = 30

    @classmethod
    def from_dict(cls, d: dict, where: str = "telemetry config") -> "BrokerSettings":
        s = cls(**{k: d[k] for k in BROKER_KEYS if k in d})
        if s.protocol not in PROTOCOLS:
            raise TelemetryError(f"{where}: protocol must be one of {sorted(PROTOCOLS)}, not {s.protocol!r}")
        if not isinstance(s.port, int) or not 0 < s.port < 65536:
            raise TelemetryError(f"{where}: port must be an integer 1-65535, not {s.port!r}")
        if s.tls is not None and not isinstance(s.tls, dict):
            raise TelemetryError(f"{where}: tls must be an object with ca_file/cert_file/key_file")
        return s

    def secret(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as e:
                raise TelemetryError(f"cannot read MQTT password file {self.password_file}: {e.strerror}") from None
        return self.password


def make_client(settings: BrokerSettings, client_id: str, *, manual_ack: bool = False, reconnect: bool = False,
                persistent: bool = False) -> mqtt.Client:
    """A configured, not yet connected paho client. `persistent` keeps the broker-side session
    across connections (MQTT 3.1.1: clean_session=False; MQTT 5 sets it at connect)."""
    protocol = PROTOCOLS[settings.protocol]
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": not persistent}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=reconnect,
        manual_ack=manual_ack,
        **kwargs,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.secret())
    if settings.tls:
        t = settings.tls
        for key in ("ca_file", "cert_file", "key_file"):
            if t.get(key) and not Path(t[key]).is_file():
                raise TelemetryError(f"TLS {key} {t[key]} does not exist")
        try:
            client.tls_set(
                ca_certs=t.get("ca_file"), certfile=t.get("cert_file"), keyfile=t.get("key_file"),
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as e:
            raise TelemetryError(f"TLS setup failed: {e}") from None
        if t.get("insecure"):
            client.tls_insecure_set(True)
    return client


def connect_properties(protocol: str, *, session_expiry_s: int | None = None):
    if PROTOCOLS[protocol] != mqtt.MQTTv5:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    return props
