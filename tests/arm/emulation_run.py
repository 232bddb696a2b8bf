"""What tests/arm runs under emulation, and the run itself (once per test session: it costs minutes,
compiling for three targets and then one emulated aarch64 process per CPU model; the same processes
run the generation check, so it adds the decoder compiles and a few seconds of emulated decoding)."""

from __future__ import annotations

import time

from deploy.tools import arm_emulation

MODELS = ("gpt2_onnx",)  # tiny real-exporter causal LM (tests/fixtures/models.py)
TARGETS = ("aarch64", "rpi5")  # generic ARMv8.0 (run on a Cortex-A53 model) and +dotprod (Cortex-A76)
PRECISIONS = ("fp32", "int8")
LENGTHS = (1, 7, 16, 45)
JIT_TARGET, JIT_SEQ = "rpi5", 24
# Text generation: a tiny random-weight llama GGUF (tests/fixtures/gguf_llama.py, 2 layers, hidden 64,
# SmolLM2's vocabulary) compiled for the host and rpi5; greedy tokens on the Cortex-A76 model.
DECODER = "tiny_llama"
QDECODER = "tiny_llama_q4_1"  # the same shape with Q4_1 weights: the weight-only 4-bit kernels on ARM
GPT2_DECODER = "tiny_gpt2"  # GPT-2 as llama.cpp writes it (tests/fixtures/gguf_gpt2.py): positions, LayerNorm, GELU
GENERATION_TARGETS = ("rpi5",)
PROMPTS = arm_emulation.DEFAULT_PROMPTS  # plain text and a ChatML turn, SmolLM2 token ids
NEW_TOKENS = 16

summaries: list[str] = []  # printed at the end of the pytest run (tests/arm/conftest.py)


def run(request, tmp_path_factory) -> arm_emulation.Report:
    from tests.fixtures.gguf_gpt2 import write_gpt2_checkpoint, write_gpt2_gguf
    from tests.fixtures.gguf_llama import write_llama_gguf

    models = {name.removesuffix("_onnx"): request.getfixturevalue(name) for name in MODELS}
    gguf_dir = tmp_path_factory.mktemp("arm_gguf")
    vocab = request.getfixturevalue("smollm2_gguf")
    gguf = write_llama_gguf(gguf_dir / f"{DECODER}.gguf", vocab)
    qgguf = write_llama_gguf(gguf_dir / f"{QDECODER}.gguf", vocab, seed=4, weight_type="Q4_1", embed_type="Q8_0")
    gpt2_model = write_gpt2_checkpoint(gguf_dir / "gpt2", vocab, seed=1)["model"]
    gpt2 = write_gpt2_gguf(gguf_dir / f"{GPT2_DECODER}.gguf", gpt2_model, vocab)
    start = time.perf_counter()
    report = arm_emulation.verify(
        models, tmp_path_factory.mktemp("arm"), targets=TARGETS, precisions=PRECISIONS, lengths=LENGTHS,
        jit_target=JIT_TARGET, jit_seq=JIT_SEQ, prompts=PROMPTS,
        decoders={DECODER: gguf["path"], QDECODER: qgguf["path"], GPT2_DECODER: gpt2},
        new_tokens=NEW_TOKENS, generation_targets=GENERATION_TARGETS, log=lambda *a, **k: None,
    )
    report.timings["total"] = time.perf_counter() - start
    summaries.append(report.summary())
    return report
