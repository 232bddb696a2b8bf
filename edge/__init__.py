"""edgejit on-device runtime. Imports nothing from the host compiler (no onnx)."""

from .errors import ArtifactError, EdgeJitError, InputError, TargetError
from .runtime import Runtime

__all__ = ["Runtime", "EdgeJitError", "ArtifactError", "InputError", "TargetError"]
