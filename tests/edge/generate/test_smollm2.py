"""The bundled chat model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF as shipped) compiled once per
session, against transformers loading the same GGUF (dequantized, fp32): greedy tokens for plain
text, code and a chat turn; chat template and tokenizer; teacher-forced top-1 agreement on real
text; the `edgejit generate` command as a user runs it, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures.decoding import greedy_decode
from tests.fixtures.hf_reference import greedy, load_gguf_model, load_gguf_tokenizer, teacher_forced_logits

pytestmark = pytest.mark.slow

N_NEW = 32
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import torch

    torch.set_num_threads(2)
    return load_gguf_model(smollm2_gguf), load_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def gen(smollm2_artifact):
    from edge.generate import Generator

    return Generator(smollm2_artifact, max_batch=1)


def _prompts(gen, hf_tok):
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return {
        "plain": gen.tokenizer.encode("The capital of France is"),
        "code": gen.tokenizer.encode("def fibonacci(n):"),
        "chat": gen.chat_prompt(CHAT),
    }, text


def test_chat_template_and_tokens_match_transformers(gen, reference):
    _, hf_tok = reference
    prompts, text = _prompts(gen, hf_tok)
    assert gen.template.render(CHAT) == text
    assert prompts["chat"] == hf_tok(text, add_special_tokens=False)["input_ids"]
    for name in ("plain", "code"):
        assert prompts[name] == hf_tok(gen.tokenizer.decode(prompts[name]))["input_ids"]


@pytest.mark.parametrize("prompt", ["plain", "code", "chat"])
def test_greedy_matches_transformers(gen, reference, prompt):
    model, hf_tok = reference
    ids = _prompts(gen, hf_tok)[0][prompt]
    want, want_logits = greedy(model, ids, N_NEW)
    toks, logits = greedy_decode(gen.model.decoder, ids, N_NEW, seq_id=99)
    err = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    assert err < 2e-3, f"logits differ by {err:.2e} of scale"
    assert toks == want


def test_fp32_compile_matches_transformers(smollm2_fp32_artifact, gen, reference):
    """The same comparison with every weight dequantized to fp32 on the host (--precision fp32)."""
    from edge.artifact.reader import Artifact
    from edge.generate.loader import load_decoder

    model, hf_tok = reference
    assert Artifact.open(smollm2_fp32_artifact).manifest.precision == "fp32"
    ids = _prompts(gen, hf_tok)[0]["chat"]
    want, want_logits = greedy(model, ids, N_NEW)
    toks, logits = greedy_decode(load_decoder(smollm2_fp32_artifact, context=512).decoder, ids, N_NEW)
    assert np.abs(logits - want_logits).max() < 2e-3 * np.abs(want_logits).max()
    assert toks == want


def _decode_forced(decoder, prompt, forced, seq_id=7):
    """Logits of the prompt's last position and of decode steps fed `forced` (teacher forcing)."""
    decoder.add_sequence(seq_id)
    try:
        out = [decoder.prefill([seq_id], [prompt])[0]]
        out += [decoder.decode([seq_id], [t])[0] for t in forced[:-1]]
    finally:
        decoder.remove_sequence(seq_id)
    return np.stack(out)


def test_int8_activations_track_transformers(smollm2_int8_artifact, gen, reference, tmp_path):
    """`edgejit compile`'s default on a VNNI host: prefill, decode steps and the LM head quantize
    their activations to int8 per group (llama.cpp's route), the KV cache is fp16. Fed transformers' greedy tokens, every step's
    logits stay within 6% of max |logit| (llama.cpp on the same file: ~6%) and pick the same next
    token in >= 90% of steps; the artifact's batch-1 step and the generic module (any batch) give
    the same bits, so a reply does not depend on the JIT or on who else is decoding."""
    from edge.artifact.reader import Artifact
    from edge.generate.loader import load_decoder
    from edge.kernels import dense_int8act
    from edge.artifact.targets import get_preset

    model, hf_tok = reference
    int8 = dense_int8act.isa(get_preset("host").tvm_target()) is not None
    quant = Artifact.open(smollm2_int8_artifact).manifest.quantization
    assert quant["activations"].startswith("int8" if int8 else "fp32")
    generic = load_decoder(smollm2_int8_artifact, max_batch=2).decoder
    variant = load_decoder(smollm2_int8_artifact, jit="default", cache_dir=tmp_path / "c", state_dir=tmp_path / "s").decoder
    agree = steps = 0
    for name, ids in _prompts(gen, hf_tok)[0].items():
        want, want_logits = greedy(model, ids, N_NEW)
        ours = _decode_forced(variant, ids, want)
        err = np.abs(ours - want_logits).max() / np.abs(want_logits).max()
        assert err < (0.06 if int8 else 4e-3), f"{name}: logits differ by {err:.2e} of scale"  # fp16 KV: ~1e-3
        agree += int((ours.argmax(-1) == np.array(want)).sum())
        steps += len(want)
        np.testing.assert_array_equal(_decode_forced(generic, ids, want), ours)
    assert agree >= 0.9 * steps, f"top-1 agreement {agree}/{steps}"
    assert variant.specializer.stats()["variants"][1]["source"] == "artifact"
    # what the device JIT builds from module.json for another batch size takes the int8 kernel too
    import tvm
    from tvm import relax

    from edge import kernels

    mod = tvm.ir.load_json((smollm2_int8_artifact / "module.json").read_text())
    bound = kernels.lower(relax.transform.BindSymbolicVars({"num_seqs": 2})(mod), get_preset("host").tvm_target(),
                          )
    assert any(gv.name_hint.startswith("dense_int8act") for gv, _ in bound.functions_items()) == int8
    # two sequences decoding together in the generic module: each gets its bits from alone
    ids = _prompts(gen, hf_tok)[0]
    a, b = ids["plain"], ids["chat"]
    alone = [greedy_decode(generic, p, 8, seq_id=3)[1] for p in (a, b)]
    generic.add_sequence(1), generic.add_sequence(2)
    try:
        rows = [generic.prefill([1, 2], [a, b])]
        toks = [int(np.argmax(r)) for r in rows[0]]
        for _ in range(7):
            rows.append(generic.decode([1, 2], toks))
            toks = [int(np.argmax(r)) for r in rows[-1]]
    finally:
        generic.remove_sequence(1), generic.remove_sequence(2)
    together = np.stack(rows)
    np.testing.assert_array_equal(together[:, 0], alone[0])
    np.testing.assert_array_equal(together[:, 1], alone[1])


def test_generator_streams_the_greedy_reply(gen, reference):
    """The Generator's text pieces join to the decoded greedy tokens; it stops at <|im_end|>."""
    model, hf_tok = reference
    ids = gen.chat_prompt(CHAT)
    want, _ = greedy(model, ids, 64)
    pieces = list(gen.chat(CHAT, max_tokens=64))
    st = gen.stats
    stop = [i for i, t in enumerate(want) if t in gen.model.stop_ids]
    expect = want[: stop[0]] if stop else want
    assert st.tokens == expect
    assert "".join(pieces) == hf_tok.decode(expect)
    assert st.finish_reason == ("stop" if stop else "length")
    assert st.prompt_tokens == len(ids) and st.completion_tokens == len(expect)


def test_top1_agreement_on_real_text(gen, reference, record_property):
    """Teacher-forced next-token agreement with transformers over real text (Debian fortunes)."""
    from deploy.tools.corpus import sentences

    model, _ = reference
    texts = [t for t in sentences() if 20 <= len(t) <= 400][:24]
    agree = total = 0
    dec = gen.model.decoder
    for i, text in enumerate(texts):
        ids = gen.tokenizer.encode(text)[:128]
        dec.add_sequence(1000 + i)
        try:
            ours = dec.score(1000 + i, ids)
        finally:
            dec.remove_sequence(1000 + i)
        ref = teacher_forced_logits(model, ids)
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    rate = agree / total
    record_property("top1_agreement", rate)
    print(f"\nSmolLM2 Q4_1 as shipped (weight-only kernels) vs transformers fp32 on the same values: top-1 agreement {rate:.4f} over {total} tokens of {len(texts)} fortunes")
    assert rate >= 0.99


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_generate_streams_text_and_reports_speed(smollm2_artifact):
    r = _cli("generate", str(smollm2_artifact), "--raw-prompt", "The capital of France is", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == " Paris.\n\nThe answer is:\n"  # transformers' greedy tokens, decoded
    last = r.stderr.strip().splitlines()[-1]
    assert "prompt 5 tokens, generated 8 tokens" in last and "time to first token" in last
    assert last.count("tok/s") == 2


def test_cli_generate_chat_stop_seed(smollm2_artifact):
    r = _cli("generate", str(smollm2_artifact), "--prompt", CHAT[0]["content"], "--max-tokens", "12")
    assert r.returncode == 0 and r.stdout.startswith("The tallest mountain in the world is Mount Everest"), r.stderr
    r = _cli("generate", str(smollm2_artifact), "--raw-prompt", "The capital of France is", "--stop", "answer")
    assert r.returncode == 0 and r.stdout == " Paris.\n\nThe \n", r.stdout
    assert "(stop)" in r.stderr
    sampled = [_cli("generate", str(smollm2_artifact), "--prompt", "Tell me a story.", "--temperature", "0.9",
                    "--top-p", "0.95", "--seed", str(seed), "--max-tokens", "16").stdout for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


@pytest.mark.parametrize("args, message", [
    (["--raw-prompt", "hi", "--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--raw-prompt", ""], "empty prompt"),
    (["--raw-prompt", "word " * 40, "--context", "16"], "the context is 16"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--raw-prompt", "hi", "--context", "100000"], "outside 1..8192"),
])
def test_cli_generate_bad_input(smollm2_artifact, args, message):
    r = _cli("generate", str(smollm2_artifact), *args)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    _one_line_error(r.stderr, message)


def _one_line_error(stderr: str, message: str) -> None:
    """The error is the last line and the only one (a warning such as 'unsigned artifact' may precede it)."""
    lines = stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("edgejit generate: error:")]
    assert errors == [lines[-1]] and message in lines[-1] and "Traceback" not in stderr, stderr


def test_cli_generate_invalid_utf8(smollm2_artifact):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "generate", str(smollm2_artifact), "--raw-prompt", b"caf\xe9 \xff"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    _one_line_error(r.stderr, "not valid UTF-8")


def test_cli_generate_refuses_an_encoder(tiny_artifact):
    r = _cli("generate", str(tiny_artifact), "--prompt", "hi")
    assert r.returncode == 1
    _one_line_error(r.stderr, "not a text-generation model")
