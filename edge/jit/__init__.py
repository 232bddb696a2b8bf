"""JIT specialization: static-shape variants for the sequence lengths a device actually sees."""

from edge.jit.policy import JitPolicy
from edge.jit.specializer import Specializer

__all__ = ["JitPolicy", "Specializer"]
