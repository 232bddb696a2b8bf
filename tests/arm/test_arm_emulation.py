"""Cross-compiled aarch64 artifacts run under qemu-user with the real edge runtime and give the same
answers as the x86 artifact and as ONNX Runtime on the same file; the runtime's CPU feature check
sees the emulated CPU; the JIT compiles a variant on the emulated device and caches it keyed to
aarch64. The run itself is the session fixture `arm_report` (tests/arm/conftest.py)."""

from __future__ import annotations

import time

import pytest

from deploy.tools import arm_emulation

from tests.arm.emulation_run import JIT_SEQ, JIT_TARGET, LENGTHS, MODELS, PRECISIONS, TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.arm]


def test_device_processes_ran_cleanly(arm_report):
    assert not arm_report.problems, "\n".join(arm_report.problems)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_arm_outputs_match_x86_and_reference(arm_report, target, precision):
    skipped = [s for s in arm_report.skipped if f" {precision}:" in s]
    if len(skipped) == len(MODELS):
        pytest.skip(f"the compiler does not build {precision} yet: {skipped[0]}")
    rows = [c for c in arm_report.comparisons if c.target == target and c.precision == precision]
    failed = [p for p in arm_report.problems if f"target {target} precision {precision}" in p]
    assert not failed, "\n".join(failed)
    assert {c.seq for c in rows} == set(LENGTHS)
    assert {c.against for c in rows} == {"x86", "reference"}
    bad = [c.describe() for c in rows if not c.ok]
    assert not bad, "\n".join(bad)


def test_feature_check_sees_the_emulated_cpu(arm_report):
    """The +dotprod artifact is refused on a CPU without dotprod, accepted with it; the generic one
    runs everywhere. edge/machine.py reads the aarch64 HWCAP bits, which qemu sets from -cpu."""
    gates = {(g["preset"], g["cpu"]): g for g in arm_report.gates}
    assert gates["aarch64", "cortex-a53"]["accepted"]
    assert gates["aarch64", "cortex-a76"]["accepted"]
    assert gates["rpi5", "cortex-a76"]["accepted"]
    refused = gates["rpi5", "cortex-a53"]
    assert not refused["accepted"] and "asimddp" in refused["error"]


def test_jit_variant_compiled_on_the_device_is_keyed_to_aarch64(arm_report):
    jit = arm_report.jit
    assert jit is not None and not jit.get("error"), jit
    assert jit["fields"]["arch"] == "aarch64"
    assert jit["fields"]["target"]["mtriple"].startswith("aarch64")
    assert jit["fields"]["bind"] == {next(iter(jit["fields"]["bind"])): JIT_SEQ}
    assert jit["elf_machine"] == arm_emulation.EM_AARCH64
    assert jit["kind"] == "variant" and jit["warm_event"] == "cache_hit"
    rows = [c for c in arm_report.comparisons if c.target == f"{JIT_TARGET} (JIT variant)"]
    assert rows and all(c.seq == JIT_SEQ for c in rows)
    bad = [c.describe() for c in rows if not c.ok]
    assert not bad, "\n".join(bad)


def test_dotprod_target_runs_dot_product_instructions(arm_report):
    """The +dotprod preset's int8 kernels are built from SDOT/UDOT, so its emulated run executed
    them on the Cortex-A76 model; the generic preset's library has none (it runs on ARMv8.0)."""
    model = MODELS[0].removesuffix("_onnx")
    counts = arm_report.instructions
    if f"{model}-int8-rpi5" not in counts:
        pytest.skip("no int8 build")
    if counts[f"{model}-int8-rpi5"] is None:
        pytest.skip("aarch64-linux-gnu-objdump missing")
    assert counts[f"{model}-int8-rpi5"]["sdot"] + counts[f"{model}-int8-rpi5"]["udot"] > 0, counts
    assert counts[f"{model}-int8-aarch64"]["sdot"] + counts[f"{model}-int8-aarch64"]["udot"] == 0, counts


def test_negative_control_dies_of_sigill(arm_report):
    """Forced past the feature check, the dotprod artifact is killed on the CPU without dotprod:
    the emulator enforces the CPU model's instruction set, so the clean runs above prove something."""
    if not any(c and c["sdot"] + c["udot"] for c in arm_report.instructions.values()):
        pytest.skip("no artifact uses dot-product instructions")
    assert [(p["artifact"].rsplit("-", 1)[1], p["cpu"]) for p in arm_report.probes] == [("rpi5", "cortex-a53")]
    assert all(p["returncode"] == -4 for p in arm_report.probes), arm_report.probes


def test_userspace_comes_from_the_cache_the_second_time(arm_report):
    start = time.perf_counter()
    us = arm_emulation.userspace(log=lambda *a: None)
    assert us.assembled_s is None and time.perf_counter() - start < 5
    assert (us.sysroot / arm_emulation.PYTHON).is_file()
