"""What this machine is: architecture, CPU features and core count, read from the OS."""

from __future__ import annotations

import functools
import os
import platform


@functools.lru_cache(maxsize=1)
def arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU feature flags as Linux names them (/proc/cpuinfo 'flags' on x86, 'Features' on ARM)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def missing_features(required: list[str]) -> list[str]:
    have = cpu_features()
    return [f for f in required if f not in have]
