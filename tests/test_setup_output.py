"""scripts/setup.sh shows progress while apt and pip work (issue 20, case 12): its dependency step
(scripts/install-deps.sh) is run in a copy of the repository with stand-ins for apt-get, sudo and
pip that print what the real ones print; the output must be a line per step and a line per package,
each as it happens (not at the end), with apt's and pip's noise left out and their errors kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

APT_GET = r"""#!/bin/bash
[ "$1" = update ] && exit 0
pkgs=(); for a in "$@"; do case "$a" in install|-*|Dpkg::*) ;; *) pkgs+=("$a");; esac; done
echo "Reading package lists..."; echo "Building dependency tree..."
if [ -n "${FAIL_APT:-}" ]; then echo "E: Unable to locate package ${pkgs[0]}" >&2; exit 100; fi
i=0; for p in "${pkgs[@]}"; do i=$((i+1)); echo "Get:$i http://deb.debian.org/debian bookworm/main amd64 $p amd64 1.0 [100 kB]"; done
for p in "${pkgs[@]}"; do echo "Selecting previously unselected package $p."; echo "Unpacking $p (1.0) ..."; done
for p in "${pkgs[@]}"; do echo "Setting up $p (1.0) ..."; done
echo "Processing triggers for man-db (2.11.2-2) ..."
"""

PYTHON3 = r"""#!/bin/bash
[ "$1" = -c ] && exit 1   # the import check: nothing installed yet
echo "Obtaining file:///repo"
echo "Collecting numpy"
echo "  Downloading numpy-2.0.0-cp311-manylinux_2_17_x86_64.whl (19.5 MB)"
sleep 1.5
echo "Collecting apache-tvm==0.27.0.post1"
echo "Requirement already satisfied: packaging in /usr/lib/python3/dist-packages"
echo "Installing collected packages: numpy, apache-tvm, edgejit"
echo "Successfully installed apache-tvm-0.27.0.post1 edgejit-0.1.0 numpy-2.0.0"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of scripts/install-deps.sh in a repository of its own, and a PATH of stand-ins (no
    mosquitto, cross linker, qemu or tmux on it: all to be installed)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install-deps.sh", repo / "scripts")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("apt-get", APT_GET), ("python3", PYTHON3), ("sudo", '#!/bin/bash\nexec "$@"\n')):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    for tool in ("dirname", "grep", "sed", "mkdir", "touch", "id", "sleep"):
        os.symlink(shutil.which(tool), bin_ / tool)
    return repo, bin_


def run(repo, bin_, **env):
    """(return code, [(seconds since start, line)] of stdout, stderr)."""
    proc = subprocess.Popen([shutil.which("bash"), str(repo / "scripts" / "install-deps.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PATH": str(bin_), **env})
    start, lines = time.monotonic(), []
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    rc = proc.wait(60)
    return rc, lines, proc.stderr.read()


def test_a_line_per_step_and_per_package_as_it_happens(repo):
    rc, lines, err = run(*repo)
    assert rc == 0, err
    text = [line for _, line in lines]
    apt = [p for p in ("gcc-aarch64-linux-gnu", "qemu-user", "tmux") if p in text[0]]
    assert len(apt) == 3, text
    steps = [line.split("] ", 1)[1] for line in text if line.startswith("== [")]
    assert steps[0].startswith("system packages: ") and steps[0].endswith("(apt-get)")
    assert steps[1:3] == ["apt-get update: reading the package lists",
                          "apt-get install: downloading, unpacking and setting up each package"]
    assert steps[3].startswith("Python packages: edgejit with its host and test extras (pip")
    assert steps[4] == "dependencies ready" and len(steps) == 5, steps
    packages = [line.strip() for line in text if line.startswith("     ")]
    for p in apt:  # one download, unpack and set-up line per package; apt's chatter left out
        assert sum(p in line for line in packages if line.startswith(("Get:", "Unpacking", "Setting up"))) == 3, packages
    assert not [line for line in text if "Reading package lists" in line or "Selecting" in line or "triggers" in line]
    assert [line for line in packages if not line.startswith(("Get:", "Unpacking", "Setting up"))] == [
        "Collecting numpy", "Collecting apache-tvm==0.27.0.post1", "Installing collected packages: numpy, apache-tvm, edgejit",
        "Successfully installed apache-tvm-0.27.0.post1 edgejit-0.1.0 numpy-2.0.0"]
    when = {line: t for t, line in lines}
    assert when["     Collecting apache-tvm==0.27.0.post1"] - when["     Collecting numpy"] > 1.0  # shown as it happens
    assert (repo[0] / ".work" / "installed").exists()


def test_an_apt_failure_stops_the_setup_with_apts_error(repo):
    rc, lines, err = run(*repo, FAIL_APT="1")
    assert rc != 0
    assert "E: Unable to locate package gcc-aarch64-linux-gnu" in err
    assert not any("Python packages" in line for _, line in lines)


def test_setup_sh_announces_the_dependency_step():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    announce = text.index('echo "== installing what edgejit needs')
    assert announce < text.index("bash scripts/install-deps.sh")
