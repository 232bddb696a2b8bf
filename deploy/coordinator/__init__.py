"""Fleet telemetry, host side: the MQTT coordinator, its SQLite store and the fleet report."""

from .coordinator import Coordinator
from .store import Store

__all__ = ["Coordinator", "Store"]
