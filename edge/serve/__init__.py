"""The on-device service (the daemon): HTTP server, request handling, model registry, metrics, config and wire codec.

`edgejit daemon --config configs/daemon.toml` (front: edge/cli/daemon.py); see docs/daemon.md.
"""

from edge.serve.config import ConfigError, DaemonConfig, load_config
from edge.serve.service import Daemon

__all__ = ["Daemon", "DaemonConfig", "ConfigError", "load_config"]
