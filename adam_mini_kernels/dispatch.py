"""Backend dispatch: a table of backends, each with an availability check and a loader.

A backend's step (``BackendStep``) is two functions, so that the step's one all-reduce per
process group (``sharding.all_reduce_split_sums``) can sit between them for every flat group:
``sums(group: FlatGroup, inv_scale=None) -> (block_sums, reducer, kept)`` takes the per-block
sums of g^2 (gradients unscaled by AMP's ``inv_scale``) that the update needs, with the reducer
of a sharded group's split blocks among them (None if the group is not sharded) and whatever
else the backend keeps for its update (or None);
``update(group, sums, active, inv_scale=None, found_inf=None, clip=None) -> None`` advances the
step counters of the parameters flagged in ``active`` (a bool tensor on the group's device;
None: all; none at all when AMP's ``found_inf`` is non-zero), computes the coefficient table
(``coefficients``: gradients unscaled, then clipped by ``clip``) and updates the group in place.
``auto`` takes the first backend of ``AUTO_ORDER`` that can run on the parameters' devices and
dtypes (Triton's CPU interpreter, for tests, only when asked for by name); an explicit request for
a backend that cannot run raises ``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

import torch

ENV_VAR = "ADAM_MINI_BACKEND"
PREFERENCE = ("cuda", "triton", "torch")
# [Note: auto and unverified backends]
# A fused backend joins ``auto`` only once its GPU test suite has passed on real hardware; until
# then it runs only when asked for by name (``backend=`` or ADAM_MINI_BACKEND), so that nobody
# gets an unverified kernel without choosing it.
AUTO_ORDER = ("torch",)  # becomes PREFERENCE once the Triton and CUDA suites pass on a GPU


class BackendStep(NamedTuple):
    """A backend's step of one flat group, in the two halves of the module docstring."""

    sums: Callable
    update: Callable

    def __call__(self, group, active, inv_scale=None, found_inf=None, clip=None) -> None:
        """Both halves, for a group that is not sharded (no all-reduce between them): how
        ``AdamMini.step`` steps an optimizer without sharded groups, group by group, and what the
        microbenchmarks time. With sharded groups it calls the halves itself."""
        sums = self.sums(group, inv_scale)
        if sums[1] is not None:
            raise ValueError("a sharded group's step all-reduces between its halves: step it with AdamMini.step()")
        self.update(group, sums, active, inv_scale, found_inf, clip)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def _any_device(devices: List[torch.device]) -> Optional[str]:
    return None


def _cuda_only(devices: List[torch.device]) -> Optional[str]:
    if any(d.type != "cuda" for d in devices):
        return "it runs on CUDA tensors only, and some parameters are not on a CUDA device"
    return None


def _cuda_or_interpreter(devices: List[torch.device]) -> Optional[str]:
    if os.environ.get("TRITON_INTERPRET") == "1" and all(d.type == "cpu" for d in devices):
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests, CI)
    reason = _cuda_only(devices)
    return reason and reason + " (or all on the CPU with TRITON_INTERPRET=1)"


# Storage dtypes of the fused kernels (fp32 math): float64 would be computed in float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # module holding the step, relative to this package
    function: str  # the module's BackendStep
    device_check: Callable[[List[torch.device]], Optional[str]]
    missing_hint: str  # what to do when the module cannot be imported
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # parameter dtypes it steps (None: any floating)
    auto_device_check: Optional[Callable[[List[torch.device]], Optional[str]]] = None  # for auto, if stricter
    loaded_device_check: Optional[str] = None  # a function of the loaded module: (devices) -> reason or None

    def dtype_reason(self, dtypes: Iterable[torch.dtype]) -> Optional[str]:
        """None if this backend steps parameters of ``dtypes``, else the reason."""
        unsupported = sorted(str(d) for d in set(dtypes) if self.dtypes is not None and d not in self.dtypes)
        if unsupported:
            supported = ", ".join(str(d) for d in self.dtypes)
            return f"its kernels store {supported} parameters, not {', '.join(unsupported)} (backend='torch' steps any)"
        return None

    def why_not(self, devices: Iterable[torch.device], dtypes: Iterable[torch.dtype] = (), auto: bool = False) -> Optional[str]:
        """None if this backend can step parameters of ``dtypes`` on ``devices`` (chosen by
        ``auto`` or by name), else the reason."""
        check = self.auto_device_check if auto and self.auto_device_check is not None else self.device_check
        reason = check(list(devices)) or self.dtype_reason(dtypes)
        if reason is not None:
            return reason
        try:
            module = self._module()
        except ImportError as err:
            return f"{self.missing_hint} ({err})"
        return getattr(module, self.loaded_device_check)(list(devices)) if self.loaded_device_check else None

    def _module(self):
        return importlib.import_module(self.module, __package__)

    def load(self) -> Callable:
        return getattr(self._module(), self.function)


BACKENDS = {
    "torch": Backend("torch", ".torch_backend", "torch_step", _any_device, "PyTorch backend failed to import"),
    "triton": Backend(
        "triton",
        ".triton_kernels.launch",
        "triton_step",
        _cuda_or_interpreter,
        "the Triton kernels cannot be loaded (is triton installed?)",
        dtypes=KERNEL_DTYPES,
        auto_device_check=_cuda_only,  # the interpreter (CPU tensors) is for tests: by name only
    ),
    "cuda": Backend(
        "cuda",
        ".cuda_backend",
        "cuda_step",
        _cuda_only,
        "the CUDA extension adam_mini_kernels._C is not built: install the package with a CUDA "
        "build of torch and nvcc on the PATH (or CUDA_HOME set), "
        "`pip install --no-build-isolation -e .`",
        dtypes=KERNEL_DTYPES,
        loaded_device_check="device_reason",  # the GPU's arch among those it was built for
    ),
}


def _default_devices() -> List[torch.device]:
    return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]


def available_backends(devices: Optional[Iterable[torch.device]] = None) -> List[str]:
    """Names of the backends that can run on ``devices`` (default: this machine's GPU if it has
    one, else the CPU), fastest first."""
    devices = list(devices) if devices is not None else _default_devices()
    return [name for name in PREFERENCE if BACKENDS[name].why_not(devices) is None]


def resolve_backend(request: str, devices: Iterable[torch.device], dtypes: Iterable[torch.dtype] = ()) -> str:
    """The backend to use for ``request`` ("auto" or a name) on parameters of ``dtypes`` on
    ``devices``; ``ADAM_MINI_BACKEND`` overrides "auto". Never fails for "auto"."""
    choices = ("auto",) + tuple(BACKENDS)
    if request not in choices:
        raise ValueError(f"backend must be one of {choices}, got {request!r}")
    if request == "auto":
        request = os.environ.get(ENV_VAR, "auto") or "auto"
        if request not in choices:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {choices}, got {request!r}")
    devices, dtypes = list(devices), list(dtypes)
    if request == "auto":
        return next(name for name in AUTO_ORDER if BACKENDS[name].why_not(devices, dtypes, auto=True) is None)
    reason = BACKENDS[request].why_not(devices, dtypes)
    if reason is not None:
        raise BackendUnavailableError(f"AdamMini backend {request!r} cannot run here: {reason}")
    return request


def load_backend(name: str) -> BackendStep:
    """The step of backend ``name``."""
    return BACKENDS[name].load()
