"""`edgejit demo --quick` as CI runs it: real broker, coordinator and daemon processes; the chat demo
(SmolLM2 through the OpenAI API, the session's compiled artifact) ends with a fleet report showing
time to first token and tokens/s; the encoder demo (`--model minilm`) shows specialized variants
serving; no process is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli import COMMANDS
from deploy.fleet.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (apt-get install mosquitto)")
@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="needs fortunes-min (apt-get install fortunes-min)")
def test_chat_demo_quick(tmp_path, smollm2_artifact):
    pytest.importorskip("openai")
    work = tmp_path / "demo"
    argv = [sys.executable, "-m", "edge.cli", "demo", "--quick", "--artifact", str(smollm2_artifact), "--workdir", str(work),
            "--report-json", str(tmp_path / "report.json")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "[6/6]" in out and "no process left running" in out
    assert out.count("    user ") >= 12 and "TTFT" in out  # 3 users x 2 turns: their messages and the replies' speed
    assert "measured by the clients: time to first token p50" in out
    assert "time to first token" in out.split("[6/6]")[1] and "decode tokens/s" in out.split("[6/6]")[1]

    rep = json.loads((tmp_path / "report.json").read_text())
    (device,) = rep["devices"]
    assert device["device"] == "demo-device" and device["state"] == "offline" and device["clean_shutdown"] is True
    (g,) = [m["generation"] for m in rep["models"].values() if m.get("generation")]
    assert g["requests"] == 6 and g["completion_tokens"] > 0
    assert g["ttft_ms"]["p50"] > 0 and g["tok_s"]["p99"] >= g["tok_s"]["p50"] > 0
    assert g["running"]["max"] >= 2  # users were decoded together
    (jit,) = [m["jit"] for m in rep["models"].values() if m.get("jit")]
    assert jit["events"].get("compile_finished", 0) + jit["events"].get("cache_hit", 0) >= 1  # decode shapes specialized
    daemon_log = (work / "daemon.log").read_text()
    assert "stopped cleanly" in daemon_log and "Traceback" not in daemon_log
    assert not _processes_mentioning(str(work)), "processes left behind"


@pytest.mark.slow
@pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (apt-get install mosquitto)")
@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="needs fortunes-min (apt-get install fortunes-min)")
def test_encoder_demo_quick(tmp_path, tiny_onnx):
    work = tmp_path / "demo"
    argv = [sys.executable, "-m", "edge.cli", "demo", "--quick", "--workdir", str(work), "--report-json", str(tmp_path / "report.json")]
    argv += ["--model", "minilm" if "example" in COMMANDS else str(tiny_onnx)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "[6/6]" in out and "no process left running" in out
    assert "now served by a specialized variant" in out  # the JIT's progress, from the daemon's log
    assert "specialized p50" in out and "latency p50: first" in out

    rep = json.loads((tmp_path / "report.json").read_text())
    (device,) = rep["devices"]
    assert device["device"] == "demo-device" and device["state"] == "offline" and device["clean_shutdown"] is True
    buckets = rep["models"]["example"]["buckets"]
    served = {}
    for b in buckets:
        for kind, n in b["kinds"].items():
            served[kind] = served.get(kind, 0) + n
    assert sum(served.values()) >= 100
    assert served.get("variant", 0) + served.get("padded", 0) > 0, served
    assert rep["models"]["example"]["jit"]["events"].get("swapped_in", 0) >= 1

    daemon_log = (work / "daemon.log").read_text()
    assert "stopped cleanly" in daemon_log and "Traceback" not in daemon_log
    assert not _processes_mentioning(str(work)), "processes left behind"
