"""The artifact on the device: its manifest schema, the reader that verifies it, signature trust, and the target presets.

The manifest schema (edge.artifact.manifest) is shared with the host writer (deploy/compiler/artifact_writer.py)."""

from edge.artifact.reader import Artifact, TensorSpec

__all__ = ["Artifact", "TensorSpec"]
