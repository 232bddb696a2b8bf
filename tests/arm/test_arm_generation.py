"""Text generation on the emulated Raspberry Pi 5: one tiny random-weight model per architecture in
one input format each (llama GGUF in fp32 and Q4_1 kept quantized with an fp16 KV cache, GPT-2 GGUF in F16 kept fp16, Qwen2 with q/k/v
biases and Mistral with a sliding window as Hugging Face directories), compiled for the rpi5 preset
and run with edge.generate under qemu-aarch64 -cpu cortex-a76: 32 greedy tokens on two prompts equal
the host's and transformers', logits within 1e-4 of the host's at every step (1e-3 with the fp16 KV cache). It runs in the emulated
process of the shared session run (tests/arm/conftest.py `arm_report`), so the aarch64 python and TVM
start once."""

from __future__ import annotations

import pytest

from deploy.tools import arm_emulation

from tests.arm.emulation_run import DECODER_OPTIONS, DECODERS, GENERATION_TARGETS, NEW_TOKENS, PROMPTS, QDECODER_INT8

pytestmark = [pytest.mark.slow, pytest.mark.arm]


@pytest.mark.parametrize("model", DECODERS)
@pytest.mark.parametrize("target", GENERATION_TARGETS)
def test_greedy_generation_on_the_emulated_cpu_matches_the_host_and_transformers(arm_report, arm_decoders, target, model):
    from tests.fixtures.hf_reference import greedy

    failed = [p for p in arm_report.problems if p.startswith(f"generation target {target} ")]
    assert not failed, "\n".join(failed)
    checks = [g for g in arm_report.generation if g.target == target and g.model == model]
    assert [g.prompt for g in checks] == list(range(len(PROMPTS)))
    assert {g.cpu for g in checks} == {"cortex-a76"}  # rpi5's Cortex-A76, with dotprod
    bad = [g.describe() for g in checks if not g.ok]
    assert not bad, "\n".join(bad)
    reference = arm_decoders[model][1]
    for g in checks:
        assert g.tokens == g.expected and len(g.tokens) == NEW_TOKENS
        assert g.error <= g.tolerance == arm_emulation.generation_tolerance(DECODER_OPTIONS.get(model, {}))
        if model != QDECODER_INT8:  # int8 activations move a random tiny model's near-ties; the host's int8
            # kernels are held to transformers on SmolLM2 (tests/edge/generate/test_smollm2.py)
            assert g.tokens == greedy(reference, PROMPTS[g.prompt], NEW_TOKENS)[0], f"{model} prompt {g.prompt}: not transformers' tokens"
        assert len(set(g.expected)) > 3  # a non-degenerate sequence: the check can tell models apart
    if model == QDECODER_INT8:  # its decode steps and prefill ran on sdot
        counts = arm_report.instructions.get(f"{model}-decoder-{target}")
        if counts is not None:  # None: no aarch64-linux-gnu-objdump
            assert counts["sdot"] > 0, counts
    assert arm_report.timings.get("generation on cortex-a76", 0) > 0
