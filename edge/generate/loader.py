"""A decoder artifact loaded for generation: the compiled module with its weights and KV cache,
the tokenizer, the chat template and the stop tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.artifact.reader import Artifact
from edge.artifact.trust import Trust
from edge.errors import ArtifactError, EdgeJitError

from edge.generate.chat_template import ChatTemplate
from edge.generate.decoder import Decoder, kv_bytes_per_token
from edge.generate.tokenizer import Tokenizer
from edge.runtime.module import load_library


@dataclass
class LoadedDecoder:
    artifact: Artifact
    decoder: Decoder
    tokenizer: Tokenizer
    template: ChatTemplate
    stop_ids: list[int]

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def config(self) -> dict:
        return self.artifact.manifest.decoder.config


def open_decoder_artifact(artifact, *, trust=None) -> Artifact:
    if isinstance(artifact, Artifact):
        art = artifact
    else:
        if trust is not None and not isinstance(trust, Trust):
            trust = Trust.load(trust)
        art = Artifact.open(Path(artifact), trust=trust)
    if not art.manifest.is_decoder:
        raise ArtifactError(f"{art.path}: not a text-generation model (kind '{art.manifest.kind}'): use `edgejit run` / edge.Runtime")
    return art


class _JitHost:
    """What edge.jit.Specializer reads of the runtime it specializes for."""

    def __init__(self, artifact, params, threads, listeners):
        self.artifact, self._params, self.threads, self.listeners = artifact, params, threads, listeners


def load_decoder(artifact, *, context: int | None = None, threads: int | None = None, max_batch: int = 1,
                 trust=None, jit=None, cache_dir=None, state_dir=None, listeners=(), kv_bytes: int | None = None,
                 extra_kv_tokens: int = 0) -> LoadedDecoder:
    """Load a decoder artifact. With `jit` (a JitPolicy, a policy file, or "default"), decode steps
    are specialized by batch size in the background (edge/jit, docs/jit.md). The KV cache takes
    `kv_bytes` in all (default: `context` tokens for each of `max_batch` sequences, plus
    `extra_kv_tokens`, e.g. the prefix cache's budget)."""
    from edge import machine

    art = open_decoder_artifact(artifact, trust=trust)
    info = art.manifest.decoder
    context = info.default_context if context is None else int(context)
    if not 1 <= context <= info.context_length:
        window = int(info.config.get("sliding_window") or 0)
        what = "its sliding attention window" if window and window == info.context_length else "the model's trained context"
        raise EdgeJitError(f"context {context} is outside 1..{info.context_length} ({what})")
    for name in (info.tokenizer.file, info.chat_template):
        if name and name not in art.manifest.files:
            raise ArtifactError(f"{art.path}: {name} is not listed (with its checksum) in the manifest")
    lib = load_library(art.file("generic.so"))
    params = art.device_params()
    if len(params) != len(info.param_names):
        raise ArtifactError(f"{art.path}: params.npz has {len(params)} weights, the manifest names {len(info.param_names)}")
    threads = threads or machine.cores()
    if kv_bytes:
        kv_tokens = int(kv_bytes) // kv_bytes_per_token(info.config)
    else:
        kv_tokens = context * max_batch + int(extra_kv_tokens)
    decoder = Decoder(lib, params, info.config, context=context, max_batch=max_batch,
                      prefill_chunk=info.prefill_chunk, threads=threads, kv_tokens=kv_tokens)
    decoder.name = art.name
    decoder.listeners = list(listeners)
    if jit is not None:
        from edge.jit import Specializer

        decoder.attach_jit(Specializer(_JitHost(art, params, threads, decoder.listeners), jit, cache_dir=cache_dir, state_dir=state_dir))
    tok_info = info.tokenizer
    tokenizer = Tokenizer(art.file(tok_info.file), bos_id=tok_info.bos_id, add_bos=tok_info.add_bos)
    template_src = art.file(info.chat_template).read_text() if info.chat_template else None
    template = ChatTemplate(template_src, bos_token=tok_info.bos_token, eos_token=tok_info.eos_token)
    return LoadedDecoder(art, decoder, tokenizer, template, list(tok_info.stop_ids))
