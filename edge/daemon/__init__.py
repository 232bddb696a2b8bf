"""The on-device daemon: serves artifacts over a local HTTP API, runs the JIT, reports telemetry.

`edgejit daemon --config configs/daemon.toml`; see docs/daemon.md. Standard library HTTP only.
"""

from .config import ConfigError, DaemonConfig, load_config
from .service import Daemon

__all__ = ["Daemon", "DaemonConfig", "ConfigError", "load_config"]
