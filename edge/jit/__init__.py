"""JIT specialization: static-shape variants for the sequence lengths a device actually sees."""

from .policy import JitPolicy
from .specializer import Specializer

__all__ = ["JitPolicy", "Specializer"]
