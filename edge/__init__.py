"""edgejit on-device runtime. Imports nothing from the host compiler (no onnx)."""

from edge.errors import ArtifactError, EdgeJitError, InputError, TargetError
from edge.runtime.runtime import Runtime
from edge.runtime.tvm_library import load_tvm

__all__ = ["Runtime", "EdgeJitError", "ArtifactError", "InputError", "TargetError", "load_tvm"]
