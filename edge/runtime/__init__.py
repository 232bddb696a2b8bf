"""The inference runtime: edge.Runtime, compiled modules, input signatures and padding, and the one compile pipeline (host builds and JIT variants)."""

from edge.runtime.runtime import Runtime

__all__ = ["Runtime"]
