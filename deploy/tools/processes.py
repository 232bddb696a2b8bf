"""Child processes of the host tools and tests: a free TCP port to give a server, and the one way
to stop a child (SIGTERM, wait, then SIGKILL, its whole process group when it has its own)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 60.0, *, group: bool | None = None) -> int:
    """SIGTERM `proc` and wait up to `timeout` s, then SIGKILL it (with `group`, its process group;
    default: when it was started in a session of its own). Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if group is None:
                group = _own_group(proc)
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
    return proc.returncode


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False
