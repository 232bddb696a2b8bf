"""User-facing errors: each carries a one-line message the CLI prints without a traceback."""


class EdgeJitError(Exception):
    """Base class: the message is complete and fits on one line."""


class ArtifactError(EdgeJitError):
    """An artifact is missing, incomplete, tampered with, or built for another machine."""


class InputError(EdgeJitError):
    """Inference inputs do not match the model's signature."""


class TargetError(EdgeJitError):
    """Unknown target preset or a toolchain the target needs is missing."""


class ModelError(EdgeJitError):
    """The ONNX model cannot be read or imported."""
