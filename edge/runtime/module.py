"""A compiled module ready to call: the shared library, the weights, and one VM per calling thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

# TVM pins the calling thread to one core when it sizes a worker pool (and never unpins it), which
# would put every request thread of a server on core 0. Leave placement to the OS scheduler.
os.environ.setdefault("TVM_BIND_THREADS", "0")


class CompiledModule:
    """Calls a compiled Relax `main(inputs..., params...)`; safe to call from many threads.

    A relax VirtualMachine keeps per-call state, so each calling thread gets its own VM over the
    same loaded library; the weights are shared read-only between all VMs and all modules.
    """

    def __init__(self, lib, params, *, kind: str, bind: dict | None = None, threads: int | None = None):
        self.lib = lib
        self.params = params  # list of tvm tensors, shared
        self.kind = kind  # "generic" or "variant"
        self.bind = dict(bind or {})
        self.threads = threads
        self._local = threading.local()

    @classmethod
    def load(cls, so_path: Path, params, **kw) -> "CompiledModule":
        return cls(load_library(so_path), params, **kw)

    def vm(self):
        """This thread's VirtualMachine over the library (created on first use)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            import tvm
            from tvm.runtime.vm import VirtualMachine  # tvm.relax needs the compiler library

            if self.threads:
                set_threads(self.threads)
            vm = VirtualMachine(self.lib, tvm.cpu())
            self._local.vm = vm
        return vm

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        out = self.vm()["main"](*args, *self.params)
        return flatten_outputs(out)


def load_library(so_path: str | Path):
    """A compiled library as a TVM module that is unloaded (dlclose) once nothing references it.

    tvm.runtime.load_module keeps every module it loads alive until the process exits (tvm_ffi's
    keep_module_alive), so each artifact version and JIT variant a long-running daemon swapped
    out would stay mapped. The module, the VMs over it and the functions taken from it each hold
    a reference, so the library stays loaded exactly as long as something can call into it."""
    import tvm_ffi

    return tvm_ffi.load_module(os.path.realpath(so_path), keep_module_alive=False)


def flatten_outputs(out) -> list[np.ndarray]:
    """A VM result (a tensor, or nested tuples of them) as a flat list of numpy arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(flatten_outputs(item))
    return result


_threads_set = threading.local()


def set_threads(n: int) -> None:
    """Size the TVM worker pool of the calling thread (TVM keeps one pool per calling thread)."""
    if getattr(_threads_set, "n", None) == n:
        return
    import os

    import tvm_ffi

    # TVM caps its pool at TVM_NUM_THREADS, or else at half the hardware threads on x86 (it
    # assumes SMT): on a 2-core box that is 1 worker whatever config_threadpool asks for.
    # The cap is read from the environment whenever a pool is (re)configured.
    # Raise it before the first pool exists: a pool first sized to 1 does not grow later.
    from edge.machine import cores

    cap = max(n, cores())
    if int(os.environ.get("TVM_NUM_THREADS", "0") or 0) < cap:
        os.environ["TVM_NUM_THREADS"] = str(cap)
    tvm_ffi.get_global_func("runtime.config_threadpool")(0, n)
    _threads_set.n = n
