"""The ARM emulation run shared by tests/arm, and its summary (with timings) at the end of the run."""

from __future__ import annotations

import pytest

from tests.arm import emulation_run


@pytest.fixture(scope="session")
def arm_decoders(smollm2_gguf, tmp_path_factory):
    """{name: (model file or directory, transformers reference)} for the generation check."""
    return emulation_run.decoders(smollm2_gguf, tmp_path_factory.mktemp("arm_decoders"))


@pytest.fixture(scope="session")
def arm_report(request, tmp_path_factory, arm_decoders):
    return emulation_run.run(request, tmp_path_factory, arm_decoders)


def pytest_terminal_summary(terminalreporter):
    for text in emulation_run.summaries:
        terminalreporter.section("ARM under emulation (deploy/tools/arm_emulation.py)")
        terminalreporter.write_line(text)
