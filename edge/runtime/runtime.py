"""edge.Runtime: load a verified artifact and run inference on numpy arrays, any sequence length."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from edge import machine
from edge.artifact.reader import Artifact
from edge.errors import ArtifactError
from edge.runtime.module import CompiledModule
from edge.runtime.signature import bind_inputs, fill_defaults
from edge.artifact.trust import Trust


class Runtime:
    """Inference over an artifact.

    `run(inputs)` takes a dict {input name: array} (or a list in signature order) with any
    sequence length from 1 to the model's maximum and any batch size, and returns the outputs
    as a list of numpy arrays in signature order. Inputs left out of a dict are filled as the CLI
    and the daemon fill them: attention masks with ones, token type ids with zeros.

    With `jit` set (a JitPolicy, or the name of a policy file in configs/), the runtime observes the
    sequence lengths it receives and compiles static-shape variants for the hot ones in the
    background; see edge/jit.

    `trust` (an edge.artifact.trust.Trust, or trusted public key files/directories) decides which
    artifacts may load; the manifest's signature is checked before anything is loaded. Without
    it, no key is configured and the artifact loads with a warning in the log; see
    docs/security.md.
    """

    def __init__(
        self,
        artifact: str | Path,
        *,
        threads: int | None = None,
        jit=None,
        cache_dir: str | Path | None = None,
        state_dir: str | Path | None = None,
        listeners=(),
        trust: Trust | str | Path | list | None = None,
    ):
        if trust is not None and not isinstance(trust, Trust):
            trust = Trust.load(trust)  # key files/directories: signed artifacts only
        self.artifact = Artifact.open(artifact, trust=trust)
        if self.artifact.manifest.is_decoder:
            raise ArtifactError(f"{self.artifact.path}: a text-generation model: use `edgejit generate` / `edgejit chat` or edge.Generator")
        self.threads = threads or machine.cores()
        self.listeners = list(listeners)
        params = self.artifact.device_params()
        self.generic = CompiledModule.load(
            self.artifact.file("generic.so"), params, kind="generic", threads=self.threads
        )
        self._params = params
        self._lock = threading.Lock()
        self.specializer = None
        if jit is not None:
            from edge.jit import Specializer

            self.specializer = Specializer(self, jit, cache_dir=cache_dir, state_dir=state_dir)

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def inputs(self):
        return self.artifact.inputs

    @property
    def outputs(self):
        return self.artifact.outputs

    def run(self, inputs) -> list[np.ndarray]:
        if isinstance(inputs, dict):  # as the CLI and the daemon: a left-out mask is ones, token types zeros
            inputs = fill_defaults(self.artifact.inputs, dict(inputs))
        arrays, dims = bind_inputs(self.artifact.inputs, inputs, self.artifact.manifest.dims)
        seq = dims.get(self.artifact.seq_dim)
        route = self.specializer.route(seq, dims) if self.specializer and seq is not None else None
        start = time.perf_counter()
        if route is None:
            outs, kind = self.generic(arrays), "generic"
        else:
            outs, kind = route.run(arrays, seq)
        latency = time.perf_counter() - start
        if self.specializer is not None and seq is not None:
            self.specializer.record(seq, kind)
        for listener in self.listeners:
            listener.on_request(self.name, seq, kind, latency)
        return outs

    def add_listener(self, listener) -> None:
        self.listeners.append(listener)

    def close(self) -> None:
        if self.specializer is not None:
            self.specializer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
