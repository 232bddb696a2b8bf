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
