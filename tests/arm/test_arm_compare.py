"""The harness's comparison (no emulation): a wrong ARM answer becomes one failure line naming the
target, precision, length and the size of the error."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.tools import arm_emulation

pytestmark = pytest.mark.arm


def test_a_wrong_answer_is_reported_with_target_precision_length_and_size(tmp_path):
    want = np.linspace(-2, 2, 24, dtype=np.float32).reshape(1, 3, 8)
    expected = {("gpt2", "int8", 3): [want], ("gpt2", "reference", 3): [want]}
    got = want.copy()
    got[0, 1, 2] += 0.064  # error 0.064 / max|want| 2 = 3.2e-2
    np.savez(tmp_path / "3.npz", o0=got)
    report = arm_emulation.Report()
    arm_emulation._compare(report, expected, "gpt2", "rpi5", "int8", 3, tmp_path / "3.npz")
    assert report.failures() == [
        "target rpi5 precision int8 seq 3 (gpt2, output 0): max |arm - x86| = 3.20e-02 (tolerance 1e-03)",
        "target rpi5 precision int8 seq 3 (gpt2, output 0): max |arm - reference| = 3.20e-02 (tolerance 2e-02)",
    ]


def test_a_matching_answer_passes_and_a_missing_output_fails(tmp_path):
    want = np.ones((1, 5, 4), np.float32)
    expected = {("m", "fp32", 5): [want, want], ("m", "reference", 5): [want, want]}
    np.savez(tmp_path / "5.npz", o0=want + 1e-6)  # second output missing
    report = arm_emulation.Report()
    arm_emulation._compare(report, expected, "m", "aarch64", "fp32", 5, tmp_path / "5.npz")
    assert [c.ok for c in report.comparisons] == [True, False, True, False]
    assert "output 1): max |arm - x86| = inf" in report.failures()[0]


def test_a_generation_mismatch_names_the_step_and_compares_logits_up_to_it(tmp_path):
    """Tokens that part at step 2: a failure line naming the step and both tokens; the logits error
    covers steps 0..2 only (after that the two runs saw different inputs)."""
    want = np.zeros((4, 10), np.float32)
    want[:, 3] = 2.0
    got = want.copy()
    got[1, 5] += 1e-3  # 1e-3 / 2 = 5e-4: over tolerance
    got[3] += 100.0  # after the parting step: not compared
    (tmp_path / "out").mkdir()
    np.savez(tmp_path / "out" / "logits.npz", p0=got)
    job = {"cpu": "cortex-a76", "generate": [{"key": ["m", "rpi5"], "prompts": [[1, 2]], "out": str(tmp_path / "out")}]}
    result = {"generate": [{"key": ["m", "rpi5"], "tokens": [[3, 3, 7, 3]], "load_s": 1.0, "run_s": 0.5}]}
    report = arm_emulation.Report()
    arm_emulation._check_generation(result, job, {"m": [([3, 3, 3, 3], want)]}, report)
    (check,) = report.generation
    assert check.error == pytest.approx(5e-4) and not check.ok
    assert report.failures() == [
        "generation target rpi5 on cortex-a76 (m, prompt 0): tokens differ from step 2: arm [7, 3] x86 [3, 3] (4 vs 4 tokens)"
    ]
    assert report.timings["generation on cortex-a76"] == 1.5
    assert "generation m rpi5 on cortex-a76: 0/1 prompts x 4 greedy tokens equal to x86, worst logit error 5.0e-04" in report.summary()
