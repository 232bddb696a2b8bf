"""The JIT policy: when to specialize, which lengths, how many, and how to compile."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import EdgeJitError
from edge import configs

MODES = ("on", "off", "readonly", "redo")


@dataclass(frozen=True)
class JitPolicy:
    mode: str = "on"
    buckets: str | int | tuple[int, ...] = 8
    min_bucket: int = 16
    min_hits: int = 3
    max_variants: int = 8
    on_budget: str = "evict_coldest"
    max_concurrent_compiles: int = 1
    isolate: bool = True
    compile_timeout_s: float = 600.0
    compile_memory_mb: int | None = 4096
    compile_nice: int = 10
    backoff_s: float = 30.0
    max_attempts: int = 3
    preload: str = "startup"
    cache_max_mb: float = 1024.0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgeJitError(f"JIT policy: mode '{self.mode}' is not one of {', '.join(MODES)}")
        if isinstance(self.buckets, list):
            object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        valid = self.buckets in ("exact", "pow2") or isinstance(self.buckets, tuple) or (
            isinstance(self.buckets, int) and not isinstance(self.buckets, bool) and self.buckets >= 1)
        if not valid:
            raise EdgeJitError(f"JIT policy: buckets must be 'exact', 'pow2', a step (integer) or a list of lengths, not {self.buckets!r}")
        if self.on_budget not in ("stop", "evict_coldest"):
            raise EdgeJitError(f"JIT policy: on_budget must be 'stop' or 'evict_coldest', not {self.on_budget!r}")
        if self.preload not in ("startup", "lazy"):
            raise EdgeJitError(f"JIT policy: preload must be 'startup' or 'lazy', not {self.preload!r}")
        if self.min_hits < 1 or self.max_variants < 0 or self.max_concurrent_compiles < 1:
            raise EdgeJitError("JIT policy: min_hits and max_concurrent_compiles must be >= 1, max_variants >= 0")

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "JitPolicy":
        """Read a policy TOML file (default: jit-policy.toml, found by edge.configs.find), then apply overrides."""
        path = Path(path) if path else configs.find("jit-policy.toml")
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise EdgeJitError(f"JIT policy {path}: {e}") from None
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "JitPolicy":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EdgeJitError(f"JIT policy: unknown key '{unknown[0]}'")
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if isinstance(d["buckets"], tuple):
            d["buckets"] = list(d["buckets"])
        return d

    def target_length(self, seq: int, max_seq: int, padding_safe: bool) -> int:
        """The length of the variant that serves a request of length `seq`."""
        if not padding_safe or self.buckets == "exact":
            return seq
        if self.buckets == "pow2":
            b = max(self.min_bucket, 1 << (seq - 1).bit_length())
        elif isinstance(self.buckets, int):
            b = -(-seq // self.buckets) * self.buckets
        else:
            b = next((x for x in self.buckets if x >= seq), seq)
        return min(b, max_seq)  # seq <= max_seq, so the result still holds the request


def resolve(jit) -> JitPolicy:
    """Accept a JitPolicy, a dict of settings, a path to a TOML file, 'default', or a mode name."""
    if isinstance(jit, JitPolicy):
        return jit
    if isinstance(jit, dict):
        return JitPolicy.load(**jit)
    if jit in (True, "default"):
        return JitPolicy.load()
    if jit in MODES:
        return JitPolicy.load(mode=jit)
    return JitPolicy.load(jit)
