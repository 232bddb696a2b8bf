"""ONNX decoders with past key values (optimum's text-generation-with-past, torch.onnx): the graph's
weights read back by structure (structure.py) onto our own model definition, checked against ONNX
Runtime on the graph itself (verify.py), so the artifact generates with our paged KV cache."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from edge.errors import ModelError

from deploy.frontends.onnx.decoder.graph import Graph, kind

__all__ = ["read", "kind", "find_graph", "OnnxDecoder"]

GRAPH_NAMES = ("model.onnx", "decoder_with_past_model.onnx")  # optimum's names, newest layout first
CHECKED = {"llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size"),
           "gpt2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}


@dataclasses.dataclass
class OnnxDecoder:
    arch: str
    config: object  # the architecture's Config
    weights: dict  # Hugging Face names and layout, fp32
    tokenizer: object
    tokenizer_info: dict
    source: dict
    sha256: str


def find_graph(path: str | Path) -> Path:
    """The decoder graph of an optimum output directory (model.onnx), or the file itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in GRAPH_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(f"{path}: no .onnx graph (an optimum export directory has model.onnx)")
    raise ModelError(f"{path}: {len(found)} .onnx graphs ({', '.join(p.name for p in found[:4])}) and none named model.onnx: "
                     "pass the decoder's .onnx file")


class _StateDict:
    """The graph's weights behind the checkpoint interface deploy/models/<arch>.weights_from_hf reads."""

    def __init__(self, path: Path, config: dict, tensors: dict):
        self.path, self.config, self._t = path, config, tensors

    def has(self, name: str) -> bool:
        return name in self._t

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._t:
            raise ModelError(f"{self.path.name}: the graph has no weight for {name}")
        return tuple(self._t[name].shape)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(shape):
            raise ModelError(f"{self.path.name}: tensor {name} has shape {list(got)}, but config.json implies {list(shape)}")

    def tensor(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._t[name], dtype=np.float32)


def _config_file(directory: Path) -> dict | None:
    p = directory / "config.json"
    if not p.is_file():
        return None
    from deploy.frontends.hf.checkpoint import _read_json

    return _read_json(p, "the model configuration")


def _digest(graph: Path, proto, config: Path) -> str:
    from edge.artifact.reader import sha256_file

    files = [graph]
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and (graph.parent / e.value) not in files:
                files.append(graph.parent / e.value)
    if config.is_file():
        files.append(config)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def read(path: str | Path, log=print) -> OnnxDecoder:
    """An ONNX decoder with past (a .onnx file, or optimum's output directory with model.onnx,
    config.json and the tokenizer files) -> our model's config and weights, verified."""
    import onnx

    from deploy.frontends.hf import tokenizer as hf_tokenizer
    from deploy.frontends.onnx import importer
    from deploy.frontends.onnx.decoder import structure, verify
    from deploy.models import registry

    graph_path = find_graph(path)
    directory = graph_path.parent
    g = Graph(importer.load(graph_path), graph_path)
    mapped = structure.map_graph(g)
    file_config = _config_file(directory)
    config = file_config if file_config is not None else mapped.config
    source = str(directory / "config.json") if file_config is not None else f"{graph_path.name} (no config.json beside it)"
    arch = registry.hf_arch(config.get("architectures"), source=source)
    family = "gpt2" if arch == "gpt2" else "llama"
    if family != mapped.family:
        raise ModelError(f"{source}: architecture {config['architectures'][0]}, but the graph is a "
                         f"{'GPT-2' if mapped.family == 'gpt2' else 'Llama-family'} decoder")
    if arch in ("llama", "mistral") and mapped.facts.get("biases"):
        raise ModelError(f"{source}: architecture {config['architectures'][0]} has no q/k/v biases, but the graph has them")
    tok, info = hf_tokenizer.load(directory, config)
    model = registry.get(arch)
    cfg = model.config_from_hf(config, source)
    if file_config is not None:
        from_graph = model.config_from_hf({**mapped.config, "architectures": config["architectures"]}, graph_path.name)
        for key in CHECKED[family]:
            if getattr(cfg, key) != getattr(from_graph, key):
                raise ModelError(f"{source}: {key} is {getattr(cfg, key)}, but the graph {graph_path.name} has {getattr(from_graph, key)}")
        if cfg.tie_word_embeddings and not mapped.facts["tied"]:
            raise ModelError(f"{source}: tie_word_embeddings is true, but the graph's head differs from its token embedding")
    else:
        log(f"note: no config.json next to {graph_path.name}: the configuration comes from the graph's shapes "
            f"(context {cfg.context_window_size}{', sliding windows unknown' if family == 'llama' else ''})")
    weights = model.weights_from_hf(_StateDict(graph_path, config, mapped.state), cfg)
    inv_freq = mapped.facts.get("inv_freq")
    if family == "llama" and inv_freq is not None:
        from deploy.models.llama.loader import rope_inv_freq

        if inv_freq.shape != (cfg.head_dim // 2,):
            raise ModelError(f"{graph_path.name}: RoPE frequencies of {inv_freq.size} values for head size {cfg.head_dim}")
        weights["rope_freqs"] = (rope_inv_freq(cfg, None) / inv_freq).astype(np.float32)  # the graph's own frequencies
    check = verify.check(g, arch, cfg, weights, log=log)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise ModelError(f"{directory / 'tokenizer.json'}: the tokenizer has more tokens ({tok.get_vocab_size(with_added_tokens=True)}) "
                         f"than the model's vocabulary ({cfg.vocab_size})")
    proto = onnx.load(str(graph_path), load_external_data=False)
    m = g.model
    log(f"read {graph_path.name}: {config['architectures'][0]} ({arch}), {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; {len(mapped.state)} weights "
        f"mapped from the graph's structure")
    source_info = {"format": "onnx", "file": graph_path.name, "producer": f"{m.producer_name} {m.producer_version}".strip(),
                   "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0),
                   "config": "config.json" if file_config is not None else "graph", "architectures": config["architectures"],
                   "check": check}
    return OnnxDecoder(arch, cfg, weights, tok, info, source_info, _digest(graph_path, proto, directory / "config.json"))
