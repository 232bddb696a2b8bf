"""Text generation on the emulated Raspberry Pi 5 (issue 15): tiny llama (fp32, Q4_1) and GPT-2 GGUF
files compiled for the rpi5 preset, run with edge.generate under qemu-aarch64 -cpu cortex-a76, give
the host's greedy tokens with logits within 1e-4 of scale at every step. It runs in the emulated process of the shared
session run (tests/arm/conftest.py `arm_report`), so the aarch64 python and TVM start once."""

from __future__ import annotations

import pytest

from deploy.tools import arm_emulation

from tests.arm.emulation_run import DECODER, GENERATION_TARGETS, GPT2_DECODER, NEW_TOKENS, PROMPTS, QDECODER

pytestmark = [pytest.mark.slow, pytest.mark.arm]


@pytest.mark.parametrize("model", [DECODER, QDECODER, GPT2_DECODER])  # fp32 weights; Q4_1 kept quantized; GPT-2
@pytest.mark.parametrize("target", GENERATION_TARGETS)
def test_greedy_generation_on_the_emulated_cpu_matches_the_host(arm_report, target, model):
    failed = [p for p in arm_report.problems if p.startswith(f"generation target {target} ")]
    assert not failed, "\n".join(failed)
    checks = [g for g in arm_report.generation if g.target == target and g.model == model]
    assert [g.prompt for g in checks] == list(range(len(PROMPTS)))
    assert {g.cpu for g in checks} == {"cortex-a76"}  # rpi5's Cortex-A76, with dotprod
    bad = [g.describe() for g in checks if not g.ok]
    assert not bad, "\n".join(bad)
    for g in checks:
        assert g.tokens == g.expected and len(g.tokens) == NEW_TOKENS
        assert g.error <= 1e-4 == arm_emulation.GENERATION_TOLERANCE
        assert len(set(g.expected)) > 3  # a non-degenerate sequence: the check can tell models apart
    assert arm_report.timings.get("generation on cortex-a76", 0) > 0
