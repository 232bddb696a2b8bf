"""Fleet telemetry, device side: an MQTT publisher (a runtime listener) with an on-disk spool.
Protocol: docs/telemetry.md. Imports paho-mqtt and ddsketch, nothing from the compiler."""

from edge.telemetry.config import TelemetryConfig
from edge.telemetry.mqtt import BrokerSettings, TelemetryError
from edge.telemetry.protocol import PROTOCOL_VERSION
from edge.telemetry.publisher import Publisher

__all__ = ["Publisher", "TelemetryConfig", "BrokerSettings", "TelemetryError", "PROTOCOL_VERSION"]
