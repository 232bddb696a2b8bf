"""The tokenizer of a Hugging Face checkpoint directory: tokenizer.json is already the `tokenizers`
format and ships as it is; special tokens, BOS and the chat template come from
tokenizer_config.json (or chat_template.jinja), stop ids from generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from edge.errors import ModelError

from deploy.frontends.hf.checkpoint import hf_json

# End-of-turn tokens the chat templates write (as in the GGUF frontend: llama.cpp's EOG set).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eom_id|>")


def _content(tok) -> str | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _ids(v) -> list[int]:
    if v is None:
        return []
    return [int(i) for i in (v if isinstance(v, list) else [v])]


def _adds_bos(tok_json: dict, bos: str | None) -> bool:
    """Whether the tokenizer's post-processor puts BOS before a single text (Llama 3 does this with
    no add_bos_token in tokenizer_config.json)."""
    procs = [tok_json.get("post_processor") or {}]
    procs = procs[0].get("processors", procs) if procs[0].get("type") == "Sequence" else procs
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return "SpecialToken" in first and first["SpecialToken"].get("id") == bos
    return False


def _chat_template(path: Path, tc: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def load(path: str | Path, config: dict):
    """-> (tokenizers.Tokenizer, info dict as the GGUF frontend gives it)."""
    from tokenizers import Tokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        hint = " (tokenizer.model alone, sentencepiece's format, is not read: save the tokenizer with transformers " \
               "to get tokenizer.json)" if (path / "tokenizer.model").is_file() else ""
        raise ModelError(f"{path}: no tokenizer.json{hint}")
    try:
        tok = Tokenizer.from_file(str(tj))
        tok_json = json.loads(tj.read_text(encoding="utf-8"))
    except Exception as e:  # the tokenizers library raises a bare Exception for bad files
        raise ModelError(f"{tj}: not a tokenizer the `tokenizers` library reads: {str(e).splitlines()[0] if str(e) else e}") from None
    tc = hf_json(path, "tokenizer_config.json")
    gen = hf_json(path, "generation_config.json")

    model = tok_json.get("model") or {}
    decoder = json.dumps(tok_json.get("decoder") or {})
    kind = "llama" if model.get("byte_fallback") else "gpt2" if "ByteLevel" in decoder else str(model.get("type", "hf")).lower()

    def token_id(text: str | None) -> int | None:
        return tok.token_to_id(text) if text else None

    bos_token, eos_token = _content(tc.get("bos_token")), _content(tc.get("eos_token"))
    bos_id = token_id(bos_token)
    if bos_id is None:
        ids = _ids(gen.get("bos_token_id", config.get("bos_token_id")))
        bos_id = ids[0] if ids else None
        bos_token = tok.id_to_token(bos_id) if bos_id is not None else None
    eos_ids = _ids(gen.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    eos_id = token_id(eos_token)
    if eos_id is None and eos_ids:
        eos_id = eos_ids[0]
        eos_token = tok.id_to_token(eos_id)
    stop = set(eos_ids) | ({eos_id} if eos_id is not None else set())
    specials = {t["content"]: t["id"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    stop |= {specials[t] for t in END_OF_TURN if t in specials}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    stop = {i for i in stop if 0 <= i < vocab}
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = _adds_bos(tok_json, bos_token)
    info = {
        "kind": kind,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "stop_ids": sorted(stop),
        "add_bos": bool(add_bos) and bos_id is not None,
        "bos_token": bos_token or "",
        "eos_token": eos_token or "",
        "chat_template": _chat_template(path, tc),
    }
    return tok, info
