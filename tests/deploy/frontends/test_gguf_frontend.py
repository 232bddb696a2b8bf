"""The GGUF frontend: bad files fail `edgejit compile` with one line that names the problem (and
write nothing); the tokenizer built from the GGUF metadata (deploy/frontends/gguf/tokenizer.py)
gives transformers' ids on real text and hard strings; the streaming detokenizer's pieces join to
the whole decode and never split a character."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.cli import compile_fails


HARD = [
    "Hello 👋 world 🌍! Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇮🇹, skin 👍🏽.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Ünïcödé àccents: café, naïve, Straße, Ελληνικά, русский, עברית, العربية.",
    "many     spaces   here  ", "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nand\t\t\tmore\n",
    "digits 1234567890 3.14159 1,000,000 2024-01-31 0x1F",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <|im_start|>glued",
    "code: def f(x):\n    return x**2  # comment\n",
    "symbols ~!@#$%^&*()_+`-=[]{}|;':\",./<>?",
    "a", " ", "\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫∂ √2 ≈ 1.414",
]


# -- bad files: one-line errors through the real command -----------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(smollm2_gguf, tmp_path_factory):
    from tests.fixtures.gguf_llama import write_llama_gguf

    return Path(write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", smollm2_gguf, seed=1)["path"])


def _write(path: Path, arch: str, tensors: dict) -> Path:
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), arch)
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bad_files(tmp: Path, tiny: Path) -> dict:
    import gguf

    data = tiny.read_bytes()
    (tmp / "notes.gguf").write_text("these are my notes, not a model\n")
    (tmp / "half.gguf").write_bytes(data[: len(data) // 2])
    (tmp / "head.gguf").write_bytes(data[:4096])  # cut inside the metadata
    _write(tmp / "mamba.gguf", "mamba", {"token_embd.weight": (np.zeros((8, 16), np.float32), None)})
    iq = gguf.GGMLQuantizationType.IQ2_XXS
    block, size = gguf.GGML_QUANT_SIZES[iq]
    _write(tmp / "iq2.gguf", "llama", {"blk.0.attn_q.weight": (np.zeros((4, 256 // block * size), np.uint8), iq)})
    return {
        "not_gguf": (tmp / "notes.gguf", [], "notes.gguf is not a GGUF file"),
        "truncated": (tmp / "half.gguf", [], f"half.gguf is truncated: {len(data) // 2} bytes, but its tensors need {len(data)}"),
        "truncated_header": (tmp / "head.gguf", [], "head.gguf is truncated: the GGUF header"),
        "architecture": (tmp / "mamba.gguf", [], "architecture 'mamba' is not supported (supported: llama, qwen2, gpt2)"),
        "quant_type": (tmp / "iq2.gguf", [], "tensor blk.0.attn_q.weight has quantization type IQ2_XXS, which edgejit does not read"),
        "missing": (tmp / "nowhere.gguf", [], "cannot read"),
        "onnx_option": (tiny, ["--precision", "int8"], "--precision int8 applies to ONNX tensor models, not to GGUF files"),
    }


@pytest.fixture(scope="module")
def bad_files(tiny_gguf, tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"), tiny_gguf)


@pytest.mark.parametrize("case", ["not_gguf", "truncated", "truncated_header", "architecture", "quant_type", "missing", "onnx_option"])
def test_compile_bad_gguf_fails_with_one_line(bad_files, case, tmp_path):
    path, extra, message = bad_files[case]
    out = tmp_path / "out"
    r = compile_fails(path, out, *extra, message=message)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr + r.stdout
    assert not out.exists()
    if case == "missing":
        assert "No such file or directory" in lines[-1] and str(path) in lines[-1]


def test_reader_accepts_the_whole_file(tiny_gguf):
    """The size check behind 'truncated' agrees with llama.cpp's reader on an intact file."""
    from deploy.frontends.gguf.reader import GGUFFile

    f = GGUFFile(tiny_gguf)
    assert f.architecture == "llama" and f.tensor("token_embd.weight").shape[1] == 64


# -- tokenizer: same ids as transformers' GGUF tokenizer ------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(smollm2_gguf, tmp_path_factory):
    """(edge Tokenizer built from the GGUF as `edgejit compile` builds it, transformers' tokenizer)."""
    from deploy.frontends.gguf import tokenizer as gguf_tokenizer
    from deploy.frontends.gguf.reader import GGUFFile
    from edge.generate.tokenizer import Tokenizer
    from tests.fixtures.hf_reference import load_gguf_tokenizer

    tok, info = gguf_tokenizer.build(GGUFFile(smollm2_gguf))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer(path, bos_id=info["bos_id"], add_bos=info["add_bos"]), load_gguf_tokenizer(smollm2_gguf)


def _texts() -> list[str]:
    from deploy.tools.corpus import sentences

    real = sentences()
    step = max(1, len(real) // 200)
    return real[::step][:200] + HARD


def test_tokenizer_matches_transformers(tokenizers):
    ours, hf = tokenizers
    texts = _texts()
    assert len(texts) >= 200
    wrong = [(t, ours.encode(t), hf(t)["input_ids"]) for t in texts if ours.encode(t) != hf(t)["input_ids"]]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, first: {wrong[0]}"
    # special tokens written in text are one token each, as in transformers
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.id_of("<|im_start|>") and ids[-1] == ours.id_of("<|im_end|>")
    # and decoding gives the text back (special tokens kept when asked)
    for t in texts:
        assert ours.decode(ours.encode(t), skip_special=False) == t
        assert ours.decode(ours.encode(t)) == hf.decode(hf(t)["input_ids"], skip_special_tokens=True)


# -- streaming detokenizer ------------------------------------------------------------------------
def _stream(tok, ids, prompt=None) -> list[str]:
    from edge.generate.tokenizer import StreamDecoder

    s = StreamDecoder(tok, prompt)
    return [s.push(i) for i in ids] + [s.flush()]


def test_stream_decoder_pieces_join_to_the_decode(tokenizers):
    ours, _ = tokenizers
    multibyte_tokens = 0
    for text in _texts():
        ids = ours.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        # a token holding part of a character yields nothing until the character is complete
        multibyte_tokens += sum(1 for i in ids if "\ufffd" in ours.decode([i]))
        for p in pieces:
            p.encode("utf-8")  # whole characters only (a lone surrogate would fail here)
    assert multibyte_tokens > 10  # the hard strings do split characters across tokens


def test_stream_decoder_continues_a_prompt(tokenizers):
    """With the prompt as context (what the Generator passes), the reply's pieces are exactly the
    text the whole sequence decodes to after the prompt's."""
    ours, _ = tokenizers
    for text in HARD + ["The capital of France is Paris. The capital of Italy is Rome."]:
        ids = ours.encode(text)
        for cut in range(1, len(ids)):
            prompt, reply = ids[:cut], ids[cut:]
            head = ours.decode(prompt)
            whole = ours.decode(ids)
            if "\ufffd" in head or not whole.startswith(head):
                continue  # cut inside a character
            pieces = _stream(ours, reply, prompt)
            assert "".join(pieces) == whole[len(head):], (text, cut, pieces)
            assert not any("\ufffd" in p for p in pieces)
