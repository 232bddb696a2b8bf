"""Architecture name (GGUF general.architecture, later HF `architectures`) -> model package."""

from __future__ import annotations

import importlib

from edge.errors import ModelError

ARCHITECTURES = {
    "llama": "deploy.models.llama",
}


def get(arch: str, *, source: str = "model"):
    """The model package for `arch`: it provides Config, Model, config_from_gguf, weights_from_gguf
    (Hugging Face names and layout) and params (the model's own parameters from those)."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"{source}: architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(ARCHITECTURES[arch])
