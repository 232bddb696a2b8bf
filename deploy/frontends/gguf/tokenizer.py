"""The model's tokenizer as a `tokenizers` tokenizer.json, built from the GGUF metadata the way
llama.cpp reads it (tokenizer.ggml.model = gpt2: byte-level BPE; llama: sentencepiece BPE)."""

from __future__ import annotations

from edge.errors import ModelError

from deploy.frontends.gguf.reader import GGUFFile

# How llama.cpp splits text before BPE, per tokenizer.ggml.pre (llama-vocab.cpp).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],  # digits one by one, then GPT-2's split
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
}
CONTROL, USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(f: GGUFFile):
    """-> (tokenizers.Tokenizer, info dict: bos/eos/stop ids, add_bos, chat_template)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelError(f"{f.path.name}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    tokens = [str(t) for t in tokens]
    types = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        alphabet = _bytes_to_unicode()
        chars = set(alphabet.values())
        vocab = {}
        for i, t in enumerate(tokens):
            spelled = t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8"))
            vocab.setdefault(spelled, i)
        merges = [tuple(m.split(" ", 1)) for m in (f.get("tokenizer.ggml.merges") or [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = str(f.get("tokenizer.ggml.pre") or "default")
        splits = SPLITS.get(pre)
        if splits is None:
            raise ModelError(f"{f.path.name}: pre-tokenizer '{pre}' is not supported (supported: {', '.join(sorted(SPLITS))})")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
        byte_level = True
    elif kind == "llama":
        scores = [float(s) for s in (f.get("tokenizer.ggml.scores") or [0.0] * len(tokens))]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = _spm_merges(tokens, scores, types)
        unk = f.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[int(unk)] if unk is not None else None,
                                   fuse_unk=True, byte_fallback=True))
        prefix = f.get("tokenizer.ggml.add_space_prefix")
        norms = ([normalizers.Prepend("▁")] if prefix is None or bool(prefix) else []) + [normalizers.Replace(" ", "▁")]
        tok.normalizer = normalizers.Sequence(norms)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix is None or bool(prefix) else [])
        )
        add_bos_default = True
        byte_level = False
    else:
        raise ModelError(f"{f.path.name}: tokenizer model '{kind}' is not supported (supported: gpt2, llama)")
    chars = set(_bytes_to_unicode().values())
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and (not byte_level or set(t) <= chars)]
    tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens(user)

    def tid(key):
        v = f.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    stop = {eos} if eos is not None else set()
    for key in ("eot_token_id", "eom_token_id"):
        if tid(key) is not None:
            stop.add(tid(key))
    # End-of-turn tokens the chat templates write; llama.cpp stops on these too (its EOG set).
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eom_id|>"):
        if t in vocab and types[vocab[t] if kind == "llama" else tokens.index(t)] == CONTROL:
            stop.add(tokens.index(t))
    add_bos = f.get("tokenizer.ggml.add_bos_token")
    info = {
        "kind": kind,
        "bos_id": bos,
        "eos_id": eos,
        "stop_ids": sorted(stop),
        "add_bos": bool(add_bos) if add_bos is not None else add_bos_default,
        "bos_token": tokens[bos] if bos is not None else "",
        "eos_token": tokens[eos] if eos is not None else "",
        "chat_template": f.get("tokenizer.chat_template"),
    }
    return tok, info


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges a sentencepiece vocabulary implies: every split of a token into two tokens of
    the vocabulary, best-scored merged token first (what transformers' converter does)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, i in vocab.items():
        if types[i] != 1 or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((scores[i], vocab[left], vocab[right], left, right))
    found.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in found]
