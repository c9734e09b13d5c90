"""adam-mini-kernels: the Adam-mini optimizer with fused kernels, a drop-in for ``adam_mini``."""

from .dispatch import BackendUnavailableError, available_backends
from .optimizer import AdamMini

Adam_mini = AdamMini  # the official class name, so that changing the import is the whole migration

__all__ = ["AdamMini", "Adam_mini", "available_backends", "BackendUnavailableError"]
__version__ = "0.1.0"
