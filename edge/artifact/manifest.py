"""The one schema of an artifact's manifest.json, shared by the host writer
(deploy/compiler/artifact_writer.py) and the device reader (edge/artifact/reader.py).

Dataclasses with `to_json()` (the dict written to manifest.json, keys in a fixed order) and
`from_json(d)` (raises ManifestError, an ArtifactError, naming what is missing or wrong). Reports
whose content belongs to the step that wrote them (padding check, int8 quantization and accuracy)
stay plain dicts inside the typed manifest. Keys this version does not know are kept in `extra`
and written back unchanged. Format history: docs/artifact.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("module.json", "params.npz", "generic.so")  # what the runtime reads


class ManifestError(ArtifactError):
    """manifest.json does not follow the schema."""


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


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str  # of the source model file
    source: str  # its file name

    @classmethod
    def from_json(cls, d: dict) -> "ModelInfo":
        return cls(d["name"], d["sha256"], d.get("source", ""))

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "source": self.source}


@dataclass(frozen=True)
class DimRange:
    """The values a symbolic dim may take; `max` is None for no limit (the batch)."""

    min: int = 1
    max: int | None = None

    @classmethod
    def from_json(cls, d: dict) -> "DimRange":
        return cls(int(d.get("min", 1)), None if d.get("max") is None else int(d["max"]))

    def to_json(self) -> dict:
        return {"min": self.min, "max": self.max}


@dataclass(frozen=True)
class TargetInfo:
    preset: str
    arch: str
    requires: list[str]  # CPU features the code needs
    tvm: dict  # the TVM target, as JSON

    @classmethod
    def from_json(cls, d: dict) -> "TargetInfo":
        return cls(d["preset"], d["arch"], list(d.get("requires", [])), d["tvm"])

    def to_json(self) -> dict:
        return {"preset": self.preset, "arch": self.arch, "requires": list(self.requires), "tvm": self.tvm}


@dataclass(frozen=True)
class TuningInfo:
    file: str
    trials_per_length: int
    lengths: list[int]
    records: int

    @classmethod
    def from_json(cls, d: dict) -> "TuningInfo":
        return cls(d["file"], int(d["trials_per_length"]), [int(n) for n in d["lengths"]], int(d["records"]))

    def to_json(self) -> dict:
        return {"file": self.file, "trials_per_length": self.trials_per_length, "lengths": list(self.lengths),
                "records": self.records}


@dataclass(frozen=True)
class Versions:
    """TVM and tvm-ffi versions; the runtime needs the ones the artifact was built with."""

    tvm: str
    ffi: str

    @classmethod
    def from_json(cls, d: dict) -> "Versions":
        return cls(d["tvm"], d["ffi"])

    def to_json(self) -> dict:
        return {"tvm": self.tvm, "ffi": self.ffi}


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer shipped in the artifact and the model's special tokens."""

    file: str  # tokenizer.json (the `tokenizers` library's format)
    kind: str  # what the source described: gpt2 (byte-level BPE), llama (sentencepiece BPE)
    bos_id: int | None
    eos_id: int | None
    stop_ids: list[int]  # generation ends at any of these (EOS, end-of-turn tokens)
    add_bos: bool  # prepend BOS to a prompt (unless it already starts with it)
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_json(cls, d: dict) -> "TokenizerInfo":
        return cls(d["file"], d["kind"], d.get("bos_id"), d.get("eos_id"), [int(i) for i in d.get("stop_ids", [])],
                   bool(d.get("add_bos", False)), d.get("bos_token", ""), d.get("eos_token", ""))

    def to_json(self) -> dict:
        return {"file": self.file, "kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "stop_ids": list(self.stop_ids), "add_bos": self.add_bos, "bos_token": self.bos_token,
                "eos_token": self.eos_token}


@dataclass(frozen=True)
class DecoderInfo:
    """What a text-generation artifact (kind "decoder") needs beyond the tensor signature: the
    architecture and its hyper-parameters, the KV cache geometry and memory, the tokenizer and
    chat template. The module has the functions prefill, decode and create_kv_cache."""

    architecture: str
    config: dict  # the model definition's hyper-parameters (hidden_size, num_hidden_layers, ...)
    context_length: int  # what the model was trained for
    default_context: int  # what the runtime allocates unless told otherwise
    prefill_chunk: int  # most prompt tokens per prefill call
    kv_bytes_per_token: int  # KV cache memory per token of context (all layers, K and V)
    weight_bytes: int  # the weights in memory
    param_names: list[str]  # the module's weights, in params.npz order
    tokenizer: TokenizerInfo
    chat_template: str | None = None  # file with the Jinja chat template, if the model has one
    source: dict = field(default_factory=dict)  # what the weights came from (format, tensor types)
    # decode steps of N sequences compiled at build time: {N: file}, the JIT's variants from the start
    variants: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "DecoderInfo":
        try:
            variants = {int(n): str(f) for n, f in (d.get("variants") or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ManifestError(f"decoder.variants must map batch sizes to files, not {d.get('variants')!r}") from None
        return cls(d["architecture"], dict(d["config"]), int(d["context_length"]), int(d["default_context"]),
                   int(d["prefill_chunk"]), int(d["kv_bytes_per_token"]), int(d["weight_bytes"]),
                   list(d["param_names"]), TokenizerInfo.from_json(d["tokenizer"]), d.get("chat_template"),
                   dict(d.get("source") or {}), variants)

    def to_json(self) -> dict:
        d = {"architecture": self.architecture, "config": self.config, "context_length": self.context_length,
             "default_context": self.default_context, "prefill_chunk": self.prefill_chunk,
             "kv_bytes_per_token": self.kv_bytes_per_token, "weight_bytes": self.weight_bytes,
             "param_names": list(self.param_names), "tokenizer": self.tokenizer.to_json(),
             "chat_template": self.chat_template, "source": self.source}
        if self.variants:
            d["variants"] = {str(n): f for n, f in sorted(self.variants.items())}
        return d


_KNOWN = ("format", "kind", "decoder", "model", "inputs", "outputs", "seq_dim", "dims", "padding", "precision", "quantization",
          "accuracy", "tuning", "target", "tvm", "pipeline", "edgejit", "created", "files")


@dataclass
class Manifest:
    model: ModelInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    seq_dim: str
    dims: dict[str, DimRange]
    target: TargetInfo
    tvm: Versions
    pipeline: int  # edge.runtime.pipeline.PIPELINE_VERSION of the build
    edgejit: str
    created: str
    precision: str = "fp32"
    padding: dict = field(default_factory=dict)  # {"safe": bool, "mode": ..., "why": ...}
    quantization: dict | None = None  # int8: deploy/quantize/int8 report
    accuracy: dict | None = None  # int8: compile-time accuracy report
    tuning: TuningInfo | None = None
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256, every file but the manifest
    format: int = FORMAT_VERSION
    kind: str = "tensor"  # "tensor": inputs -> outputs in one call (encoders); "decoder": text generation
    decoder: DecoderInfo | None = None  # kind "decoder" only
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def max_seq(self) -> int:
        return int(self.dims[self.seq_dim].max)

    @property
    def padding_safe(self) -> bool:
        return bool(self.padding.get("safe"))

    def to_json(self) -> dict:
        d = {
            "format": self.format,
            "kind": self.kind,
            "model": self.model.to_json(),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "seq_dim": self.seq_dim,
            "dims": {n: r.to_json() for n, r in self.dims.items()},
            "padding": self.padding,
            "precision": self.precision,
        }
        if self.quantization is not None:
            d["quantization"] = self.quantization
            d["accuracy"] = self.accuracy
        if self.tuning is not None:
            d["tuning"] = self.tuning.to_json()
        if self.decoder is not None:
            d["decoder"] = self.decoder.to_json()
        d.update({
            "target": self.target.to_json(),
            "tvm": self.tvm.to_json(),
            "pipeline": self.pipeline,
            "edgejit": self.edgejit,
            "created": self.created,
            **self.extra,
            "files": dict(self.files),
        })
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("the manifest is not a JSON object")
        if d.get("format") != FORMAT_VERSION:
            raise ManifestError(f"artifact format {d.get('format')} is not supported (this runtime reads format {FORMAT_VERSION})")
        try:
            return cls(
                format=d["format"],
                kind=_kind(d.get("kind", "tensor")),
                decoder=DecoderInfo.from_json(d["decoder"]) if d.get("kind") == "decoder" else None,
                model=ModelInfo.from_json(d["model"]),
                inputs=[TensorSpec.from_json(s) for s in d["inputs"]],
                outputs=[TensorSpec.from_json(s) for s in d["outputs"]],
                seq_dim=d["seq_dim"],
                dims={n: DimRange.from_json(r) for n, r in d["dims"].items()},
                padding=dict(d.get("padding") or {}),
                precision=d.get("precision", "fp32"),
                quantization=d.get("quantization"),
                accuracy=d.get("accuracy"),
                tuning=TuningInfo.from_json(d["tuning"]) if d.get("tuning") else None,
                target=TargetInfo.from_json(d["target"]),
                tvm=Versions.from_json(d["tvm"]),
                pipeline=d.get("pipeline", 0),
                edgejit=d.get("edgejit", "unknown"),
                created=d.get("created", ""),
                files=dict(d.get("files", {})),
                extra={k: v for k, v in d.items() if k not in _KNOWN},
            )
        except KeyError as e:
            raise ManifestError(f"the manifest has no {e.args[0]!r} entry") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    def dims_json(self) -> dict[str, dict]:
        """The dims as the input binder takes them ({name: {"min", "max"}})."""
        return {n: r.to_json() for n, r in self.dims.items()}


KINDS = ("tensor", "decoder")


def _kind(k) -> str:
    if k not in KINDS:
        raise ManifestError(f"artifact kind {k!r} is not known to this runtime (known: {', '.join(KINDS)})")
    return k
