"""The CUDA backend's step: the hand-written kernels of ``csrc/`` (the extension
``adam_mini_kernels._C``), called as the operators ``torch.ops.adam_mini_kernels.*`` over the
group's launch tables (``adam_mini_kernels.launch_tables``), the same tables and decomposition as
the Triton backend. See [Note: operator granularity] in ``csrc/bindings.cpp``.

Importing this module raises ``ImportError`` when the extension is not built (or was built from
sources whose table layout differs from this package's); ``dispatch`` turns that into an error
that says how to build it. The fake implementations below let ``torch.compile`` (and anything
else running on fake or meta tensors) trace the operators.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch

from . import buffers, coefficients, launch_tables, op_checks, quantization, rounding
from .buffers import FlatGroup
from .dispatch import BackendStep
from .launch_tables import fused_sums, fused_update

try:
    from . import _C
except ImportError as err:  # not built: a CPU-only torch, no nvcc, ADAM_MINI_SKIP_CUDA_BUILD=1, ...
    raise ImportError(f"adam_mini_kernels._C is not built or does not load: {err}") from err


def _expected_constants() -> dict:
    """The constants the kernels must have been compiled with, from their Python definitions."""
    names = (
        "ROW_START ROW_NUMEL ROW_V ROW_PARAM ROW_SCALE ROW_COLS TILE_START TILE_NUMEL TILE_BLOCK TILE_SCALE TILE_COLS "
        "LB_V LB_PARAM LB_FIRST_TILE LB_NUM_TILES LB_NUMEL LB_COLS ROW_MAX TILE ADAM_TILE"
    ).split()
    expected = {name: getattr(launch_tables, name) for name in names}
    for name in ("C_DECAY C_STEP_SIZE C_BC2_SQRT C_EPS C_BETA2 C_V_WEIGHT C_M_WEIGHT C_GRAD_SCALE C_CLIP C_ROUND_KEY NUM_COEFFICIENTS").split():
        expected[name] = getattr(coefficients, name)
    expected["QBLOCK"], expected["CODE_MAX"] = quantization.QBLOCK, quantization.CODE_MAX
    for name in ("MIX_MUL1", "MIX_MUL2", "GOLDEN", "MOMENT_STREAM"):
        expected[name] = getattr(rounding, name)
    for name in ("HP_LR", "HP_WEIGHT_DECAY", "HP_BETA1", "HP_BETA2", "HP_EPS", "NUM_HPARAMS"):
        expected[name] = getattr(buffers, name)
    return expected


def _check_constants() -> None:
    compiled = _C.CONSTANTS
    expected = _expected_constants()
    wrong = {name: (compiled.get(name), value) for name, value in expected.items() if compiled.get(name) != value}
    if wrong:
        details = ", ".join(f"{name} is {c} in C++ and {p} in Python" for name, (c, p) in sorted(wrong.items()))
        raise ImportError(
            f"adam_mini_kernels._C was built from other sources than this package ({details}); rebuild it with "
            "`pip install --no-build-isolation --no-deps -e .`"
        )


_check_constants()

_ops = torch.ops.adam_mini_kernels


# -- fake implementations --------------------------------------------------------------------------
# What they check is shared with the Triton backend's operators (op_checks.py).


@torch.library.register_fake("adam_mini_kernels::rows_step")
def _rows_step_fake(p, g, m, m_scales, v, coef, rows, width, stochastic_rounding):
    op_checks.check_rows("rows_step", p, g, m, m_scales, v, coef, rows, width, stochastic_rounding)


@torch.library.register_fake("adam_mini_kernels::large_blocks_sumsq")
def _large_blocks_sumsq_fake(g, inv_scale, tiles, blocks, partial, block_sums):
    op_checks.check_large_blocks_sumsq("large_blocks_sumsq", g, inv_scale, tiles, blocks, partial, block_sums)


@torch.library.register_fake("adam_mini_kernels::large_blocks_update")
def _large_blocks_update_fake(p, g, m, m_scales, v, coef, tiles, blocks, block_sums, stochastic_rounding):
    op_checks.check_large_blocks_update(
        "large_blocks_update", p, g, m, m_scales, v, coef, tiles, blocks, block_sums, stochastic_rounding
    )


@torch.library.register_fake("adam_mini_kernels::adam_step")
def _adam_step_fake(p, g, m, v, coef, tiles, stochastic_rounding):
    op_checks.check_adam("adam_step", p, g, m, v, coef, tiles, stochastic_rounding)


@torch.library.register_fake("adam_mini_kernels::step_coefficients")
def _step_coefficients_fake(steps, hparams, coef, active, inv_scale, found_inf, clip, round_seed, stochastic_rounding):
    op_checks.check_coefficients(
        "step_coefficients", steps, hparams, coef, active, inv_scale, found_inf, clip, round_seed, stochastic_rounding
    )


# -- availability ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _has_kernel_image(device_index: int) -> bool:
    return _C.has_kernel_image(device_index)


def device_reason(devices: List[torch.device]) -> Optional[str]:
    """None if the kernels were built for the arch of every CUDA device in ``devices``, else why
    not (see [Note: kernel images] in ``csrc/adam_mini_step.cu``)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    indices = sorted({torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"})
    missing = [i for i in indices if not _has_kernel_image(i)]
    if not missing:
        return None
    archs = ", ".join(f"cuda:{i} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})" for i in missing)
    return (
        f"adam_mini_kernels._C was not built for the arch of {archs}: rebuild it with that arch in "
        "TORCH_CUDA_ARCH_LIST, e.g. `TORCH_CUDA_ARCH_LIST=\"7.5;8.0;9.0+PTX\" pip install --no-build-isolation -e .`"
    )


# -- the step --------------------------------------------------------------------------------------


def cuda_sums(group: FlatGroup, inv_scale: Optional[torch.Tensor] = None):
    """The large blocks' sums of g^2 with the CUDA kernels (one operator, two launches; see
    ``launch_tables.fused_sums``)."""
    return fused_sums(group, _ops, inv_scale)


def cuda_update(
    group: FlatGroup,
    sums,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> None:
    """The rest of the step with the CUDA kernels: the coefficient table (one launch), then one
    operator call per row class, one for the large blocks' update (two launches), one for the
    Adam tiles (see ``launch_tables.fused_update``)."""
    fused_update(group, _ops, sums, active, inv_scale, found_inf, clip)


cuda_step = BackendStep(cuda_sums, cuda_update)
