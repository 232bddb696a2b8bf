"""Which TVM this process loads: a process that only runs compiled modules (`edgejit generate`,
`chat`, `run`, `daemon`; edge.Generator after edge.load_tvm()) loads TVM's runtime library alone.

`import tvm` otherwise loads libtvm_compiler (~260 MB on disk, ~110 MiB resident once imported)
and, through tvm_ffi, torch whenever it is installed (~185 MiB and ~1 s). Running an artifact
needs neither: the relax VM, the paged KV cache builtins (vm.builtin.*) and module loading are in
libtvm_runtime. What needs the compiler is a JIT compile in this process (policy isolate = false);
the compile worker (edge/jit/worker.py) is a separate process that always loads the full TVM."""

from __future__ import annotations

import os
import sys

RUNTIME_LIB_ENV = "TVM_USE_RUNTIME_LIB"  # read by tvm/base.py when tvm is first imported
# Imported by tvm_ffi only if installed, used by nothing on the device path: torch (tvm_ffi imports
# it eagerly; the compile worker keeps it out too) and, when nothing compiles here, ml_dtypes (numpy
# dtypes for bfloat16/float8: ~0.4 s of import; artifacts' weights, inputs and outputs are
# int/float16/float32).
_NOT_FOR_RUNNING = ("torch", "ml_dtypes")
_NOT_FOR_COMPILING = ("torch",)


def load_tvm(*, compiler: bool = False) -> bool:
    """Import TVM for this process, before anything else does: its runtime library alone unless
    `compiler`; without torch (nor ml_dtypes, unless `compiler`). Returns whether only the runtime
    library is loaded.
    A process that has already imported TVM keeps the TVM it has."""
    if "tvm" not in sys.modules:
        blocked = [m for m in (_NOT_FOR_COMPILING if compiler else _NOT_FOR_RUNNING) if m not in sys.modules]
        saved_env = os.environ.get(RUNTIME_LIB_ENV)
        for m in blocked:
            sys.modules[m] = None  # `import m` raises ImportError, which tvm_ffi and tvm tolerate
        if compiler:
            os.environ.pop(RUNTIME_LIB_ENV, None)
        else:
            os.environ[RUNTIME_LIB_ENV] = "1"
        try:
            _quiet_type_lookups()
            import tvm  # noqa: F401
        finally:
            for m in blocked:
                if sys.modules.get(m, 0) is None:
                    del sys.modules[m]
            # Child processes choose for themselves (the compile worker needs the compiler).
            if saved_env is None:
                os.environ.pop(RUNTIME_LIB_ENV, None)
            else:
                os.environ[RUNTIME_LIB_ENV] = saved_env
    return runtime_only()


def _quiet_type_lookups() -> None:
    """Make tvm_ffi's type-key lookups answer "unknown" without raising inside the library.

    `import tvm` registers Python classes for object types that only the compiler library defines;
    each such lookup fails in C++, and the first failure initializes libbacktrace for the error's
    stack trace: ~30 MiB of resident memory that is never given back (measured: TVM's import adds
    52 MiB of RSS with it, 19 MiB without). The keys the libraries registered are listed without
    an error, so an unknown key is answered from that list (refreshed on every miss, as loading a
    library can register more)."""
    import tvm_ffi
    from tvm_ffi import core

    lookup = core._object_type_key_to_index
    if getattr(lookup, "_edgejit_quiet", False):
        return
    list_keys = tvm_ffi.get_global_func("ffi.GetRegisteredTypeKeys")
    known: set[str] = set()

    def quiet_lookup(type_key):
        if type_key not in known:
            known.update(str(k) for k in list_keys())
            if type_key not in known:
                return None
        return lookup(type_key)

    quiet_lookup._edgejit_quiet = True
    core._object_type_key_to_index = quiet_lookup


def runtime_only() -> bool:
    """Whether this process's TVM is the runtime library alone (False before tvm is imported)."""
    base = sys.modules.get("tvm.base")
    return bool(getattr(base, "_RUNTIME_ONLY", False))


def needs_compiler(jit_policy) -> bool:
    """Whether a JIT with this policy (a JitPolicy or None) compiles in this process."""
    return jit_policy is not None and jit_policy.mode in ("on", "redo") and not jit_policy.isolate
