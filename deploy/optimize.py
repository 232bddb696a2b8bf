"""Host-side Relax rewrites before the build: precision, weight layouts (see edge/kernels)."""

from __future__ import annotations


def prepare(mod, params, target, *, precision: str = "fp32"):
    """Return (module ready for edge.build.build, params in the layout that module expects)."""
    if precision != "fp32":
        from edge.errors import EdgeJitError

        raise EdgeJitError(f"precision '{precision}' is not supported yet")
    return mod, params
