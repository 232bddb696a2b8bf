"""The one compile pipeline, shared by the host compiler and the device's JIT.

The host builds the generic module (sequence length symbolic) with it; the device JIT builds
static-shape variants from the same Relax module with `bind={"seq": 128}`. Anything that changes
the generated code must be reflected in PIPELINE_VERSION, which is part of every cache key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge.errors import TargetError

# Bump when the pipeline or the kernels change the code they generate.
PIPELINE_VERSION = "24"


def build(mod, target: dict, *, bind: dict[str, int] | None = None, tuning=None):
    """Compile a Relax IRModule (params as inputs) for `target` into a relax Executable.

    `tuning` (edge.runtime.tuning_records.TuningRecords, checked for this target) schedules the functions it has
    records for; they match only static shapes it was tuned for.
    """
    import tvm
    from tvm import relax

    from edge import kernels

    if bind:
        mod = relax.transform.BindSymbolicVars(bind)(mod)
    tvm_target = tvm.target.Target(target)
    mod = kernels.optimize(mod, tvm_target, tuning=tuning)
    with tvm_target, tvm.transform.PassContext(opt_level=3, config={"s_tir.LoopPartition": {"partition_const_loop": True}}):
        return tvm.compile(mod, target=tvm_target, relax_pipeline=kernels.relax_pipeline(tvm_target))


def export(executable, path: Path, target: dict) -> None:
    """Write a compiled executable as a shared library, cross-linking when the target is foreign."""
    from tvm.support import cc

    triple = target.get("mtriple", "")
    fcompile = None
    if triple.startswith("aarch64"):
        linker = "aarch64-linux-gnu-gcc"
        if shutil.which(linker) is None:
            raise TargetError(
                f"missing aarch64 linker '{linker}': install the Debian package gcc-aarch64-linux-gnu"
            )
        fcompile = cc.cross_compiler(linker)
    executable.export_library(str(path), fcompile=fcompile)
