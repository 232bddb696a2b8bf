"""Writes an artifact directory, for any compile driver: the files go to a temporary directory
next to the destination, then the manifest (edge.artifact.manifest.Manifest, with the sha256 of
every file) is written and optionally signed, and the directory is renamed into place, so a
half-written artifact is never seen under its name.

    with ArtifactWriter(out, force=force) as w:
        pipeline.export(executable, w.path("generic.so"), target)
        w.write_text("module.json", module_json)
        w.write_params(params)
        w.commit(manifest, signing_key=key, log=log)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edge.artifact.manifest import MANIFEST, Manifest, TargetInfo, Versions
from edge.artifact.params import write_params
from edge.artifact.reader import edgejit_version, sha256_file, tvm_versions
from edge.errors import EdgeJitError
from edge.files import atomic_dir


def now_utc() -> str:
    """The manifest's `created` stamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_fields(preset) -> dict:
    """The manifest fields every compile driver fills the same way: the target preset, the TVM
    versions, the build pipeline, the edgejit version and the `created` stamp.
    `Manifest(**build_fields(preset), model=..., ...)`."""
    from edge.runtime.pipeline import PIPELINE_VERSION

    return {
        "target": TargetInfo(preset.name, preset.arch, list(preset.requires), json.loads(json.dumps(preset.target))),
        "tvm": Versions(**tvm_versions()),
        "pipeline": PIPELINE_VERSION,
        "edgejit": edgejit_version(),
        "created": now_utc(),
    }


class ArtifactWriter:
    """Context manager: `path(name)`/`write_text`/`write_params` fill the artifact, `commit`
    writes the manifest and signature; leaving the block without an exception puts the directory
    in place (replacing an existing one only when `force`), with one removes everything."""

    def __init__(self, out: str | Path, *, force: bool = False):
        self.out = Path(out)
        self.check_destination(self.out, force=force)
        self._ctx = None
        self.dir: Path | None = None
        self.manifest: Manifest | None = None

    @staticmethod
    def check_destination(out: str | Path, *, force: bool = False) -> None:
        """Refuse to replace an existing `out` without `force` (call it before a long compile)."""
        if Path(out).exists() and not force:
            raise EdgeJitError(f"{out} exists (pass --force to replace it)")

    def __enter__(self) -> "ArtifactWriter":
        self._ctx = atomic_dir(self.out, 0o755)
        self.dir = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None and self.manifest is None:
            err = EdgeJitError(f"{self.out}: artifact left without a manifest (commit() was not called)")
            self._ctx.__exit__(EdgeJitError, err, None)
            raise err
        return bool(self._ctx.__exit__(*exc))

    def path(self, name: str) -> Path:
        """Where to write the artifact file `name` (for writers that take a path)."""
        if Path(name).name != name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"not an artifact file name: {name!r}")
        return self.dir / name

    def write_text(self, name: str, text: str) -> Path:
        p = self.path(name)
        p.write_text(text)
        return p

    def write_params(self, params, name: str = "params.npz") -> Path:
        """The weights as numpy arrays p0, p1, ... in the order the module takes them (no pickle),
        each 64-byte aligned in the file so that the device maps them in place (edge/artifact/params.py)."""
        return write_params(self.path(name), params)

    def commit(self, manifest: Manifest, *, signing_key=None, log=print) -> Manifest:
        """Fill in the manifest's file checksums, write manifest.json and, with `signing_key`
        (from deploy.compiler.signing.load_private_key), manifest.sig. Returns the manifest."""
        manifest.files = {p.name: sha256_file(p) for p in sorted(self.dir.iterdir())}
        (self.dir / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        if signing_key is not None:
            from deploy.compiler import signing

            log(f"signed manifest with key {signing.sign_artifact(self.dir, signing_key)[:16]}…")
        self.manifest = manifest
        return manifest
