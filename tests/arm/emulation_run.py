"""What tests/arm runs under emulation, and the run itself (once per test session: it costs minutes,
compiling for three targets and then one emulated aarch64 process per CPU model; the same processes
run the generation check, so it adds the decoder compiles and some seconds of emulated decoding)."""

from __future__ import annotations

import time

from deploy.tools import arm_emulation

MODELS = ("gpt2_onnx",)  # tiny real-exporter causal LM (tests/fixtures/models.py)
TARGETS = ("aarch64", "rpi5")  # generic ARMv8.0 (run on a Cortex-A53 model) and +dotprod (Cortex-A76)
PRECISIONS = ("fp32", "int8")
LENGTHS = (1, 7, 16, 45)
JIT_TARGET, JIT_SEQ = "rpi5", 24
# Text generation: one tiny random-weight model per architecture (2 layers, hidden 64, SmolLM2's
# vocabulary) in one input format each, compiled for the host and rpi5; greedy tokens on the
# Cortex-A76 model against the host's and transformers'.
DECODER = "tiny_llama"  # llama GGUF, GQA (tests/fixtures/gguf_llama.py)
QDECODER = "tiny_llama_q4_1"  # the same shape with Q4_1 weights: the weight-only 4-bit kernels on ARM
# the same file compiled for int8 activations (`edgejit compile`'s default): rpi5's sdot kernels
QDECODER_INT8 = "tiny_llama_q4_1_int8"
# GPT-2 as llama.cpp writes it (tests/fixtures/gguf_gpt2.py): positions, LayerNorm, GELU; F16 matrices,
# kept fp16 by the compile (the fp16-widening dense kernel on ARM)
GPT2_DECODER = "tiny_gpt2"
QWEN2_DECODER = "tiny_qwen2"  # Hugging Face directory (tests/fixtures/hf_checkpoints.py): q/k/v biases, untied head
MISTRAL_DECODER = "tiny_mistral"  # Hugging Face directory: sliding window 64 (the context stays within it)
DECODERS = (DECODER, QDECODER, QDECODER_INT8, GPT2_DECODER, QWEN2_DECODER, MISTRAL_DECODER)
DECODER_OPTIONS = {QDECODER: {"kv_cache": "fp16"}, QDECODER_INT8: {"kv_cache": "fp16", "matmul_activations": "int8"}}
GENERATION_TARGETS = ("rpi5",)
PROMPTS = arm_emulation.DEFAULT_PROMPTS  # plain text and a ChatML turn, SmolLM2 token ids
NEW_TOKENS = 32  # context: the longest prompt (18) + 32 = 50, within Mistral's window

summaries: list[str] = []  # printed at the end of the pytest run (tests/arm/conftest.py)


def decoders(vocab, directory) -> dict[str, tuple[str, object]]:
    """{name: (GGUF file or checkpoint directory, transformers model with the values it holds)}."""
    from tests.fixtures.gguf_gpt2 import write_gpt2_checkpoint, write_gpt2_gguf
    from tests.fixtures.gguf_llama import write_llama_gguf
    from tests.fixtures.hf_checkpoints import write_checkpoint
    from tests.fixtures.hf_reference import hf_model, load_gguf_model

    out = {}
    for name, opts in {DECODER: {}, QDECODER: dict(seed=4, weight_type="Q4_1", embed_type="Q8_0")}.items():
        fx = write_llama_gguf(directory / f"{name}.gguf", vocab, **opts)
        out[name] = (fx["path"], hf_model(fx["config"], fx["state_dict"]))  # the file's (dequantized) values
    out[QDECODER_INT8] = out[QDECODER]
    gpt2 = write_gpt2_checkpoint(directory / "gpt2", vocab, seed=1)["model"]
    path = write_gpt2_gguf(directory / f"{GPT2_DECODER}.gguf", gpt2, vocab, weight_type="F16")
    out[GPT2_DECODER] = (path, load_gguf_model(path))  # the file's fp16 values
    for name, arch, opts in [(QWEN2_DECODER, "qwen2", dict(seed=2, tie_word_embeddings=False, rope_theta=1e6)),
                             (MISTRAL_DECODER, "mistral", dict(seed=3, sliding_window=64))]:
        fx = write_checkpoint(directory / name, arch, vocab, **opts)
        out[name] = (fx["path"], fx["model"])
    return out


def run(request, tmp_path_factory, decoders: dict) -> arm_emulation.Report:
    models = {name.removesuffix("_onnx"): request.getfixturevalue(name) for name in MODELS}
    start = time.perf_counter()
    report = arm_emulation.verify(
        models, tmp_path_factory.mktemp("arm"), targets=TARGETS, precisions=PRECISIONS, lengths=LENGTHS,
        jit_target=JIT_TARGET, jit_seq=JIT_SEQ, prompts=PROMPTS,
        decoders={name: path for name, (path, _) in decoders.items()}, decoder_options=DECODER_OPTIONS,
        new_tokens=NEW_TOKENS, generation_targets=GENERATION_TARGETS, log=lambda *a, **k: None,
    )
    report.timings["total"] = time.perf_counter() - start
    summaries.append(report.summary())
    return report
