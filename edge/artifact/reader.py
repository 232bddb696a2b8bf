"""The artifact reader: opens an artifact directory (manifest.json plus the files it lists, each
with its sha256) and verifies it before anything is loaded. The manifest's schema: manifest.py.

Layout (format 1):
    manifest.json   what the artifact is; see docs/artifact.md
    module.json     the Relax module (params as inputs, sequence length symbolic), for JIT variants
    params.npz      the weights, already in the layout the kernels expect (numpy, no pickle)
    generic.so      the generic module compiled for the target
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from edge import machine
from edge.artifact import params as params_file
from edge.artifact.manifest import FORMAT_VERSION, MANIFEST, REQUIRED_FILES, Manifest, ManifestError, TensorSpec
from edge.artifact.trust import Trust
from edge.errors import ArtifactError

__all__ = ["Artifact", "FORMAT_VERSION", "MANIFEST", "Manifest", "TensorSpec", "edgejit_version", "sha256_file", "tvm_versions"]


def sha256_file(path: Path) -> str:
    return _sha256_and_stat(path)[0]


def _sha256_and_stat(path: Path) -> tuple[str, os.stat_result]:
    """The file's sha256 and the stat of the very file that was hashed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest(), st


def edgejit_version() -> str:
    """This package's version (pyproject.toml is the one place it is written down)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgejit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def tvm_versions() -> dict:
    import tvm
    from importlib.metadata import version

    return {"tvm": tvm.__version__, "ffi": version("apache-tvm-ffi")}


class Artifact:
    """A verified artifact on disk. Construct with Artifact.open(path)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self.signed_by: str | None = None  # id of the trusted key that signed it, if checked
        self.inputs = manifest.inputs
        self.outputs = manifest.outputs
        self._verified: dict[str, os.stat_result] = {}  # file name -> its stat when its checksum matched

    # -- facts from the manifest -------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.model.name

    @property
    def model_sha256(self) -> str:
        return self.manifest.model.sha256

    @property
    def seq_dim(self) -> str:
        return self.manifest.seq_dim

    @property
    def max_seq(self) -> int:
        return self.manifest.max_seq

    @property
    def target(self) -> dict:
        return self.manifest.target.tvm

    @property
    def precision(self) -> str:
        return self.manifest.precision

    def file(self, name: str) -> Path:
        return self.path / name

    def load_params(self) -> list[np.ndarray]:
        with np.load(self.file("params.npz"), allow_pickle=False) as z:
            return [z[f"p{i}"] for i in range(len(z.files))]

    def device_params(self) -> list:
        """The weights as TVM tensors, mapped from the verified file in place where its layout
        allows, else copied one array at a time: never two copies of the weights (params.py)."""
        return params_file.device_tensors(self.file("params.npz"), expect_stat=self._verified.get("params.npz"))

    # -- loading and checks --------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, check_host: bool = True, trust: Trust | None = None) -> "Artifact":
        """Open and verify an artifact. The manifest's signature is checked against `trust`
        (default: Trust(), which has no keys and loads with a warning) before anything else is
        read, then every file's checksum against the manifest."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise ArtifactError(f"{path}: not an artifact directory")
        if not mpath.is_file():
            raise ArtifactError(f"{path}: no {MANIFEST} (not an artifact, or an incomplete one)")
        try:
            manifest_bytes = mpath.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{mpath}: unreadable manifest: {e}") from None
        # The signature covers these exact bytes; everything below parses the same bytes.
        signed_by = (trust if trust is not None else Trust()).verify(path, manifest_bytes)
        try:
            manifest = Manifest.from_json(json.loads(manifest_bytes))
        except ValueError as e:
            raise ArtifactError(f"{mpath}: unreadable manifest: {e}") from None
        except ManifestError as e:
            raise ManifestError(f"{mpath}: {e}") from None
        art = cls(path, manifest)
        art.signed_by = signed_by
        art.verify_files()
        if check_host:
            art.check_host()
        return art

    def verify_files(self) -> None:
        files = self.manifest.files
        for name in REQUIRED_FILES:
            if name not in files:
                raise ArtifactError(f"{self.path}: the manifest does not list {name} (so it cannot be verified)")
        for name, digest in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ArtifactError(f"{self.path}: the manifest lists a file outside the artifact: {name!r}")
            p = self.path / name
            if not p.is_file():
                raise ArtifactError(f"{self.path}: file {name} listed in the manifest is missing")
            actual, st = _sha256_and_stat(p)
            if actual != digest:
                raise ArtifactError(f"{self.path}: checksum mismatch for {name} (file changed or corrupt)")
            self._verified[name] = st

    def check_host(self) -> None:
        tgt = self.manifest.target
        if tgt.arch != machine.arch():
            raise ArtifactError(
                f"{self.path}: built for {tgt.arch} (preset {tgt.preset}), this machine is {machine.arch()}"
            )
        missing = machine.missing_features(tgt.requires)
        if missing:
            raise ArtifactError(
                f"{self.path}: built for CPU features this machine lacks: {', '.join(missing)} (preset {tgt.preset})"
            )
        built, here = self.manifest.tvm, tvm_versions()
        if built.to_json() != here:
            raise ArtifactError(
                f"{self.path}: built with TVM {built.tvm} / ffi {built.ffi}, "
                f"this runtime has TVM {here['tvm']} / ffi {here['ffi']}"
            )
