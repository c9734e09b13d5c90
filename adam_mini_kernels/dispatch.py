"""Backend dispatch: a table of backends, each with an availability check and a loader.

A backend's step function has the signature ``step(group: FlatGroup, coef: Tensor) -> None``
(``coef`` is the table of ``coefficients.step_coefficients``) and updates the group in place.
``auto`` takes the first backend of ``AUTO_ORDER`` that can run on the parameters' devices; an
explicit request for a backend that cannot run raises ``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch

ENV_VAR = "ADAM_MINI_BACKEND"
AUTO_ORDER = ("cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # module holding the step function, relative to this package
    function: str
    needs_cuda: bool
    missing_hint: str  # what to do when the module cannot be imported

    def why_not(self, devices: Iterable[torch.device]) -> Optional[str]:
        """None if this backend can step parameters on ``devices``, else the reason."""
        if self.needs_cuda and any(d.type != "cuda" for d in devices):
            return "it runs on CUDA tensors only, and some parameters are not on a CUDA device"
        try:
            self.load()
        except ImportError as err:
            return f"{self.missing_hint} ({err})"
        return None

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module, __package__), self.function)


BACKENDS = {
    "torch": Backend("torch", ".torch_backend", "torch_step", False, "PyTorch backend failed to import"),
    "triton": Backend(
        "triton",
        ".triton_kernels.adam_mini_step",
        "triton_step",
        True,
        "the Triton kernels are not available in this installation (is triton installed?)",
    ),
    "cuda": Backend(
        "cuda",
        ".cuda_backend",
        "cuda_step",
        True,
        "the CUDA extension adam_mini_kernels._C is not built: install the package with a CUDA "
        "build of torch and nvcc on the PATH (or CUDA_HOME set), "
        "`pip install --no-build-isolation -e .`",
    ),
}


def _default_devices() -> List[torch.device]:
    return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]


def available_backends(devices: Optional[Iterable[torch.device]] = None) -> List[str]:
    """Names of the backends that can run on ``devices`` (default: this machine's GPU if it has
    one, else the CPU), in ``auto``'s order of preference."""
    devices = list(devices) if devices is not None else _default_devices()
    return [name for name in AUTO_ORDER if BACKENDS[name].why_not(devices) is None]


def resolve_backend(request: str, devices: Iterable[torch.device]) -> str:
    """The backend to use for ``request`` ("auto" or a name); ``ADAM_MINI_BACKEND`` overrides
    "auto". Never fails for "auto"."""
    choices = ("auto",) + tuple(BACKENDS)
    if request not in choices:
        raise ValueError(f"backend must be one of {choices}, got {request!r}")
    if request == "auto":
        request = os.environ.get(ENV_VAR, "auto") or "auto"
        if request not in choices:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {choices}, got {request!r}")
    devices = list(devices)
    if request == "auto":
        return next(name for name in AUTO_ORDER if BACKENDS[name].why_not(devices) is None)
    reason = BACKENDS[request].why_not(devices)
    if reason is not None:
        raise BackendUnavailableError(f"AdamMini backend {request!r} cannot run here: {reason}")
    return request


def load_backend(name: str) -> Callable:
    """The step function of backend ``name``."""
    return BACKENDS[name].load()
