"""The artifact: a directory with manifest.json plus the files it lists, each with its sha256.

Layout (format 1):
    manifest.json   what the artifact is; see docs/artifact.md
    module.json     the Relax module (params as inputs, sequence length symbolic), for JIT variants
    params.npz      the weights, already in the layout the kernels expect (numpy, no pickle)
    generic.so      the generic module compiled for the target
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import host
from .errors import ArtifactError
from .trust import Trust

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("module.json", "params.npz", "generic.so")  # what the runtime reads


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints for static dims, strings for symbolic ones
    range: tuple | None = None  # (min, max) allowed values, e.g. token ids within the vocabulary

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["range"]) if d.get("range") else None)

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.range:
            d["range"] = list(self.range)
        return d


class Artifact:
    """A verified artifact on disk. Construct with Artifact.open(path)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.signed_by: str | None = None  # id of the trusted key that signed it, if checked
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]

    # -- facts from the manifest -------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def model_sha256(self) -> str:
        return self.manifest["model"]["sha256"]

    @property
    def seq_dim(self) -> str:
        return self.manifest["seq_dim"]

    @property
    def max_seq(self) -> int:
        return int(self.manifest["dims"][self.seq_dim]["max"])

    @property
    def target(self) -> dict:
        return self.manifest["target"]["tvm"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def file(self, name: str) -> Path:
        return self.path / name

    def load_params(self) -> list[np.ndarray]:
        with np.load(self.file("params.npz"), allow_pickle=False) as z:
            return [z[f"p{i}"] for i in range(len(z.files))]

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
            manifest = json.loads(manifest_bytes)
        except ValueError as e:
            raise ArtifactError(f"{mpath}: unreadable manifest: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise ArtifactError(
                f"{mpath}: artifact format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                f" is not supported (this runtime reads format {FORMAT_VERSION})"
            )
        art = cls(path, manifest)
        art.signed_by = signed_by
        art.verify_files()
        if check_host:
            art.check_host()
        return art

    def verify_files(self) -> None:
        files = self.manifest.get("files", {})
        for name in REQUIRED_FILES:
            if name not in files:
                raise ArtifactError(f"{self.path}: the manifest does not list {name} (so it cannot be verified)")
        for name, digest in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ArtifactError(f"{self.path}: the manifest lists a file outside the artifact: {name!r}")
            p = self.path / name
            if not p.is_file():
                raise ArtifactError(f"{self.path}: file {name} listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise ArtifactError(f"{self.path}: checksum mismatch for {name} (file changed or corrupt)")

    def check_host(self) -> None:
        tgt = self.manifest["target"]
        if tgt["arch"] != host.arch():
            raise ArtifactError(
                f"{self.path}: built for {tgt['arch']} (preset {tgt['preset']}), this machine is {host.arch()}"
            )
        missing = host.missing_features(tgt.get("requires", []))
        if missing:
            raise ArtifactError(
                f"{self.path}: built for CPU features this machine lacks: {', '.join(missing)} (preset {tgt['preset']})"
            )
        built, here = self.manifest["tvm"], tvm_versions()
        if built != here:
            raise ArtifactError(
                f"{self.path}: built with TVM {built['tvm']} / ffi {built['ffi']}, "
                f"this runtime has TVM {here['tvm']} / ffi {here['ffi']}"
            )
