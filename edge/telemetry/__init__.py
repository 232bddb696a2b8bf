"""Fleet telemetry, device side: an MQTT publisher (a runtime listener) with an on-disk spool.
Protocol: docs/telemetry.md. Imports paho-mqtt and ddsketch, nothing from the compiler."""

from .config import TelemetryConfig
from .mqtt import BrokerSettings, TelemetryError
from .protocol import PROTOCOL_VERSION
from .publisher import Publisher

__all__ = ["Publisher", "TelemetryConfig", "BrokerSettings", "TelemetryError", "PROTOCOL_VERSION"]
