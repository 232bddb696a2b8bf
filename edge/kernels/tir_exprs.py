"""TIR expressions the hand-written kernels share: a software prefetch of the cache line a load
reads, and a balanced reduction tree."""

from __future__ import annotations


def prefetch(load):
    """The call that prefetches, for reading, the cache line holding `load` (a buffer load) into
    every cache level: a statement inside T.evaluate (TVMScript) or tirx.Evaluate (built directly)."""
    from tvm import tirx

    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(load), i32(0), i32(3), i32(1))


def tree(op, items):
    """op(op(a, b), op(c, d))...: a balanced tree, so the terms are independent (a chain would
    make each wait for the one before)."""
    items = list(items)
    while len(items) > 1:
        items = [op(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]
