"""Fleet telemetry, host side: the MQTT coordinator, its SQLite store and the fleet report."""

from deploy.fleet.coordinator.coordinator import Coordinator
from deploy.fleet.coordinator.store import Store

__all__ = ["Coordinator", "Store"]
