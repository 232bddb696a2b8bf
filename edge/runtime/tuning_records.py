"""Tuning records shipped in an artifact (tuning.json), applied when a module is built.

`edgejit compile --tune` (deploy/compiler/tuner.py) runs MetaSchedule on the host for static shapes: each
tuned sequence length L with every other symbolic dim (batch) bound to 1. A record is matched to a
PrimFunc by the function's structure alone, and the same structure exists on every target, so the
file names the target (and the CPU features it requires) it was tuned for and is refused for any
other: x86 schedules are never applied to an aarch64 build.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge.errors import ArtifactError

FILE = "tuning.json"
FORMAT = 1


def canonical_target(target: dict) -> str:
    """The target as compared between tuning and build (MetaSchedule's num-cores left out)."""
    return json.dumps({k: v for k, v in target.items() if k != "num-cores"}, sort_keys=True)


def workload_mod(func):
    """The IRModule under which a PrimFunc is tuned and looked up (the same on both sides)."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def static_bind(dims: list[str], seq_dim: str, length: int) -> dict[str, int]:
    """The shape a tuned length is built for: seq_dim = length, every other symbolic dim 1."""
    return {d: (length if d == seq_dim else 1) for d in dims}


class TuningRecords:
    """The best schedule per tuned workload, for one target."""

    def __init__(self, data: dict, source: str = FILE):
        self.data = data
        self.source = source
        self._db = None
        self.applied: list[str] = []  # functions the last apply() scheduled from records

    @classmethod
    def load(cls, path: str | Path, target: dict, requires: list[str] | None = None) -> "TuningRecords":
        """Read `path` and check it was tuned for `target` (and its CPU features)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ArtifactError(f"cannot read tuning records {path}: {e}") from None
        return cls(data, str(path)).check(target, requires)

    def check(self, target: dict, requires: list[str] | None = None) -> "TuningRecords":
        data, where = self.data, self.source
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not an edgejit tuning file of format {FORMAT}")
        theirs = data.get("target", {})
        if not isinstance(theirs, dict) or canonical_target(theirs) != canonical_target(target):
            raise ArtifactError(f"{where} was tuned for {json.dumps(theirs, sort_keys=True)}, not for this build's target "
                                f"{json.dumps(target, sort_keys=True)}: records are never applied across targets")
        if requires is not None and sorted(data.get("requires", [])) != sorted(requires):
            raise ArtifactError(f"{where} was tuned for CPU features {data.get('requires')}, not {requires}")
        if not isinstance(data.get("records"), list) or not isinstance(data.get("lengths"), dict) or "seq_dim" not in data:
            raise ArtifactError(f"{where}: incomplete tuning file (records, lengths, seq_dim)")
        return self

    @property
    def lengths(self) -> list[int]:
        return sorted(int(n) for n in self.data.get("lengths", {}))

    @property
    def dims(self) -> list[str]:
        return list(self.data.get("dims", []))

    @property
    def seq_dim(self) -> str:
        return self.data["seq_dim"]

    def bind(self, length: int) -> dict[str, int]:
        return static_bind(self.dims, self.seq_dim, length)

    def database(self):
        if self._db is None:
            from tvm.s_tir import meta_schedule as ms

            db = ms.database.MemoryDatabase()
            try:
                for entry in self.data["records"]:
                    workload = ms.database.Workload.from_json(entry["workload"])
                    db.commit_workload(workload.mod)
                    db.commit_tuning_record(ms.database.TuningRecord.from_json(entry["record"], workload))
            except Exception as e:  # TVM raises many kinds on malformed JSON
                raise ArtifactError(f"{self.source}: malformed tuning record: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            self._db = db
        return self._db

    def apply(self, mod):
        """Schedule every unscheduled PrimFunc of `mod` that has a record (mod is updated)."""
        import tvm
        from tvm import tirx

        from edge.kernels.rules import is_scheduled

        db = self.database()
        target = tvm.target.Target.current()
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            wmod = workload_mod(func)
            if not db.has_workload(wmod):
                continue
            sch = db.query_schedule(wmod, target, "main")
            if sch is not None:
                updates[gv] = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        self.applied = sorted(gv.name_hint for gv in updates)
        return mod
