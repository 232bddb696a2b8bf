"""Text <-> token ids with the maintained `tokenizers` library, from the artifact's tokenizer.json
(built on the host from the model file's own tokenizer description)."""

from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeJitError


class Tokenizer:
    def __init__(self, path: str | Path, *, bos_id: int | None, add_bos: bool):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the Rust library raises its own Exception type
            raise EdgeJitError(f"cannot read tokenizer {path}: {e}") from None
        # Parsing tokenizer.json (3.5 MB for SmolLM2) leaves ~16 MiB of freed heap that glibc keeps
        # resident: give it back before the weights and the KV cache fault in on top of it.
        from edge.runtime.memory import trim_heap

        trim_heap()
        self.bos_id, self.add_bos = bos_id, add_bos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. <|im_start|>) are matched whole.
        BOS is added when the model asks for it, unless the text already starts with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def id_of(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Incremental detokenization: text pieces that never split a UTF-8 character and keep the
    spaces a whole-sequence decode gives (a decoder may drop the space a token starts with when
    decoded alone, so each step decodes a short window of context and emits the difference)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        context = list(prompt_ids[-4:]) if prompt_ids else []
        self.ids = context
        self.prefix = 0
        self.read = len(context)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character is emitted as U+FFFD, as decoders do)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]
