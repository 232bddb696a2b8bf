"""The README's daemon command with the shipped example config works on a fresh machine once the
README's first steps are done (issue 20, case 11): the README's block is run as written, with the
system directories it creates (/etc, /var) moved under a temporary root and `sudo` left out, and
the shipped config rewritten the same way (and onto a free port)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np

import edge
from tests.edge.serve.daemon_helpers import ROOT, DaemonProcess, free_port
from tests.fixtures import handmade


def readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run it as a service", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def relocate(text: str, root) -> str:
    return text.replace("sudo ", "").replace("/etc/", f"{root}/etc/").replace("/var/", f"{root}/var/")


def test_readme_first_steps_then_the_daemon_with_the_shipped_config(tiny_onnx, tmp_path):
    lines = readme_block()
    daemon_line = lines[-1].split("#")[0].strip()
    assert daemon_line == "edgejit daemon --config configs/daemon.toml", lines
    root = tmp_path / "root"
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(tiny_onnx, work / "model.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = "set -euo pipefail\nedgejit() { %s -m edge.cli \"$@\"; }\n" % sys.executable
    script += relocate("\n".join(lines[:-1]), root) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    # the shipped config, with the same directories moved and a free port
    port = free_port()
    shipped = (ROOT / "configs" / "daemon.toml").read_text()
    config = relocate(shipped, root).replace("port = 8765", f"port = {port}", 1)
    assert config.count(str(root)) == shipped.count("/etc/") + shipped.count("/var/")
    (work / "configs").mkdir()
    (work / "configs" / "daemon.toml").write_text(config)
    d = DaemonProcess(work / "configs" / "daemon.toml", port, tmp_path / "daemon.log")
    d.start()  # waits for GET /health -> 200 {"status": "ok"}
    try:
        status, doc = d.get("/health")
        assert status == 200 and doc["status"] == "ok" and doc["models"] == {"minilm": "ready"}, doc
        inputs = handmade.inputs(1, 6)
        status, got, _ = d.infer("minilm", inputs)
        assert status == 200, got
        with edge.Runtime(work / "model-host", trust=work / "keys" / "release.pub") as rt:
            np.testing.assert_allclose(got["hidden"], rt.run(inputs)[0], rtol=1e-5, atol=1e-5)
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert "Traceback" not in log and "UNSIGNED" not in log, log
