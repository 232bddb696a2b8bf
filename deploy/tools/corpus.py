"""Real text for realistic request lengths: Debian's fortunes (short real texts, the length mix
of chat messages), tokenized with the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import EdgeJitError

FORTUNES = Path("/usr/share/games/fortunes")


def sentences(directory: Path = FORTUNES) -> list[str]:
    """Every fortune in the directory's text files (entries are separated by lines holding '%')."""
    texts = []
    files = sorted(p for p in directory.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
    for path in files:
        entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        texts += [" ".join(e.split()) for e in entries if e.strip()]
    if not texts:
        raise EdgeJitError(f"no texts under {directory}: install the Debian package fortunes-min")
    return texts


def tokenize(tokenizer_json: Path, texts: list[str], max_len: int = 512) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(texts)]


def request_stream(tokenizer_json: Path, n: int, seed: int = 0, max_len: int = 512) -> list[list[int]]:
    """n token-id sequences drawn (with a fixed seed) from the real texts."""
    texts = sentences()
    rng = np.random.default_rng(seed)
    picked = [texts[i] for i in rng.integers(0, len(texts), n)]
    return tokenize(tokenizer_json, picked, max_len)
