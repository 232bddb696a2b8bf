"""This machine (the one the code runs on; the project says "host" for the build machine): its
architecture, CPU features and core count, read from the OS, and where edgejit keeps its files."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


# Linux's names for the aarch64 AT_HWCAP and AT_HWCAP2 bits (asm/hwcap.h), in bit order: the same
# words /proc/cpuinfo prints on its 'Features' line.
_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
          "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
           "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 "
           "smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16").split()


def _aarch64_hwcaps() -> frozenset[str]:
    """Features from the kernel's hardware capability bits (getauxval). Under qemu-user these
    describe the emulated CPU (-cpu), while /proc/cpuinfo is the x86 host's."""
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        words = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
    except (OSError, AttributeError):
        return frozenset()
    return frozenset(
        name for word, names in zip(words, (_HWCAP, _HWCAP2)) for bit, name in enumerate(names) if word >> bit & 1
    )


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU feature flags as Linux names them (/proc/cpuinfo 'flags' on x86, HWCAP bits on ARM)."""
    if arch() == "aarch64" and (hwcaps := _aarch64_hwcaps()):
        return hwcaps
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo 'model name'), for reports."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def missing_features(required: list[str]) -> list[str]:
    have = cpu_features()
    return [f for f in required if f not in have]


def cache_dir(*parts: str) -> Path:
    """edgejit's cache directory on this machine ($XDG_CACHE_HOME/edgejit, default ~/.cache/edgejit), joined with `parts`."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgejit")).joinpath(*parts)


def state_dir(*parts: str) -> Path:
    """edgejit's state directory ($XDG_STATE_HOME/edgejit, default ~/.local/state/edgejit), joined with `parts`."""
    import platformdirs

    return Path(platformdirs.user_state_dir("edgejit")).joinpath(*parts)
