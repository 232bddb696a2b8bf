"""Device processes load TVM's runtime library only (edge/runtime/tvm_library.py): `edgejit generate`,
a Generator whose JIT compiles in the worker process, and the daemon serve from libtvm_runtime with
libtvm_compiler (and torch) never mapped, and give the tokens the full library gives. A daemon whose
JIT compiles in-process (isolate = false) loads the compiler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.edge.test_device_imports import BLOCK
from tests.fixtures.decoding import greedy_decode

ROOT = Path(__file__).resolve().parents[2]
PROMPT_IDS = [504, 3575, 282, 4649, 314]
TEXT = "The capital of France is"
LIBS = """
import sys
maps = open('/proc/self/maps').read()
print('LIBS', 'compiler' if 'libtvm_compiler' in maps else 'runtime-only', 'torch' if 'torch' in sys.modules else 'no-torch', file=sys.stderr)
"""


def _reference(art, n=8):
    """Greedy tokens and text from this test process, whose TVM is the full library."""
    from edge.generate import Generator

    with Generator(art) as gen:
        toks = greedy_decode(gen.model.decoder, PROMPT_IDS, n)[0]
        text = "".join(gen.complete(TEXT, max_tokens=n))
    return toks, text


def _libs(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("LIBS ")).split(" ", 1)[1]


def test_generate_command_on_the_runtime_library(tiny_llamas):
    _, art = tiny_llamas["q4_1_gqa"]  # the weight-only 4-bit kernels, as a GGUF model compiles
    _, want = _reference(art)
    code = BLOCK + f"""
from edge.cli import main
rc = main(["generate", {str(art)!r}, "--raw-prompt", {TEXT!r}, "--max-tokens", "8", "--no-jit"])
""" + LIBS + "sys.exit(rc)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert _libs(r.stderr) == "runtime-only no-torch"
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt ")][-1]
    assert "peak RSS" in stats and "MiB (weights" in stats and "KV cache" in stats, stats


def test_generator_with_a_worker_jit_on_the_runtime_library(tiny_llamas, tmp_path):
    """edge.load_tvm() in a library process: the generic module and the JIT's batch-1 variant
    (compiled by the worker with the full TVM) both serve, with the full library's tokens."""
    _, art = tiny_llamas["gqa_tied"]
    want, _ = _reference(art, 12)
    code = f"""
import json, sys
import edge
assert edge.load_tvm()
from edge.generate import Generator
from edge.jit.policy import JitPolicy
from tests.fixtures.decoding import greedy_decode
kinds = []
class Listener:
    def on_request(self, model, batch, kind, seconds):
        kinds.append(kind)
with Generator({str(art)!r}, jit=JitPolicy(min_hits=1, isolate=True, preload="lazy"), cache_dir={str(tmp_path / 'cache')!r},
               state_dir={str(tmp_path / 'state')!r}, listeners=[Listener()]) as gen:
    first = greedy_decode(gen.model.decoder, {PROMPT_IDS}, 12)[0]
    assert gen.model.decoder.specializer.wait_idle(300)
    kinds.clear()
    second = greedy_decode(gen.model.decoder, {PROMPT_IDS}, 12)[0]
print(json.dumps([first, second, sorted(set(kinds))]))
""" + LIBS
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    first, second, kinds = json.loads(r.stdout)
    assert first == want and second == want
    assert kinds == ["variant"]
    assert _libs(r.stderr) == "runtime-only no-torch"


@pytest.mark.parametrize("isolate", [True, False])
def test_daemon_loads_the_compiler_only_to_compile_in_process(tiny_llamas, tmp_path, isolate):
    from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, write_config

    _, art = tiny_llamas["gqa_tied"]
    _, want = _reference(art)
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": art}, server={"port": port},
                       jit={"policy": "on", "isolate": isolate, "min_hits": 1000},  # the library choice, not a compile
                       paths={"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")})
    with DaemonProcess(cfg, port, tmp_path / "daemon.log") as d:
        body = json.dumps({"model": "tiny", "prompt": TEXT, "max_tokens": 8, "temperature": 0}).encode()
        status, _, data = d.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert status == 200, data
        assert json.loads(data)["choices"][0]["text"] == want
        maps = open(f"/proc/{d.proc.pid}/maps").read()
        metrics = d.metrics()
    assert ("libtvm_compiler" in maps) == (not isolate)
    assert "libtvm_runtime" in maps and "/torch/" not in maps
    assert metrics["process_resident_memory_bytes"] > 0
    assert metrics["edgejit_process_peak_resident_memory_bytes"] >= metrics["process_resident_memory_bytes"]


def test_runtime_import_stays_small():
    """TVM's import registers classes for types only the compiler library defines; those lookups
    must not fail inside the library, whose first error maps libbacktrace's state for good (~30 MiB
    of RSS: measured 52 MiB for the import with it, 19 without)."""
    code = """
import numpy, edge
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
before = rss()
assert edge.load_tvm()
from tvm_ffi import core
assert core._object_type_key_to_index('no.such.Type') is None
assert core._object_type_key_to_index('ffi.Shape') is not None
print(round(rss() - before, 1))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 35, out.stdout
