"""The device installs from a wheel: build it, install it in a fresh venv (no system site packages,
no host extra) and run the device commands there, outside the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.tools.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(argv, **kw):
    kw.setdefault("timeout", 900)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    """A clean venv with the edgejit wheel and the device dependencies only; returns (bin dir, env)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # build from a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "tests", "bench", ".pytest_cache", ".work"))
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", work / "dist", src])
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (work / "dist").glob("edgejit-*.whl")
    venv = work / "venv"
    r = _run([sys.executable, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(XDG_CACHE_HOME=str(work / "cache"), XDG_STATE_HOME=str(work / "state"), PYTHONNOUSERSITE="1")
    r = _run([bin_dir / "python", "-m", "pip", "install", "--quiet", wheel], env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return bin_dir, env, work


def test_wheel_ships_device_and_host_code_without_host_dependencies(device_venv):
    bin_dir, env, work = device_venv
    code = ("import importlib.util as u, edge, sys\n"
            "assert not any(m == 'deploy' or m.startswith('deploy.') for m in sys.modules), sorted(sys.modules)\n"
            "assert u.find_spec('onnx') is None and u.find_spec('torch') is None\n"
            "assert edge.__file__.startswith(sys.prefix), edge.__file__\n"
            "print(u.find_spec('deploy') is not None)")
    r = _run([bin_dir / "python", "-c", code], env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_targets_from_package_data(device_venv):
    bin_dir, env, work = device_venv
    r = _run([bin_dir / "edgejit", "targets"], env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "rpi5" in r.stdout and "x86-64-avx2" in r.stdout


def test_run_an_artifact(device_venv, tiny_artifact):
    bin_dir, env, work = device_venv
    r = _run([bin_dir / "edgejit", "run", tiny_artifact, "--input", "input_ids=[[1,2,3]]"], env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_daemon_serves_health(device_venv, tiny_artifact):
    bin_dir, env, work = device_venv
    port = free_port()
    proc = subprocess.Popen([str(bin_dir / "edgejit"), "daemon", "--model", f"tiny={tiny_artifact}", "--allow-unsigned",
                             "--listen", f"127.0.0.1:{port}"], env=env, cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    health = json.loads(resp.read())
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert health is not None, proc.stdout.read() if proc.poll() is not None else "no answer from /health"
    finally:
        stop_process(proc)


def test_host_command_names_the_extra(device_venv, tmp_path):
    bin_dir, env, work = device_venv
    (tmp_path / "m.onnx").write_bytes(b"not really")
    r = _run([bin_dir / "edgejit", "compile", tmp_path / "m.onnx", "-o", tmp_path / "out"], env=env, cwd=work)
    assert r.returncode != 0
    assert "pip install 'edgejit[host]'" in r.stderr, r.stderr
