"""What tests/arm runs under emulation, and the run itself (once per test session: it costs minutes,
compiling for three targets and then one emulated aarch64 process per CPU model)."""

from __future__ import annotations

import time

from deploy.tools import arm_emulation

MODELS = ("gpt2_onnx",)  # tiny real-exporter causal LM (tests/fixtures/models.py)
TARGETS = ("aarch64", "rpi5")  # generic ARMv8.0 (run on a Cortex-A53 model) and +dotprod (Cortex-A76)
PRECISIONS = ("fp32", "int8")
LENGTHS = (1, 7, 16, 45)
JIT_TARGET, JIT_SEQ = "rpi5", 24

summaries: list[str] = []  # printed at the end of the pytest run (tests/arm/conftest.py)


def run(request, tmp_path_factory) -> arm_emulation.Report:
    models = {name.removesuffix("_onnx"): request.getfixturevalue(name) for name in MODELS}
    start = time.perf_counter()
    report = arm_emulation.verify(
        models, tmp_path_factory.mktemp("arm"), targets=TARGETS, precisions=PRECISIONS, lengths=LENGTHS,
        jit_target=JIT_TARGET, jit_seq=JIT_SEQ, log=lambda *a, **k: None,
    )
    report.timings["total"] = time.perf_counter() - start
    summaries.append(report.summary())
    return report
