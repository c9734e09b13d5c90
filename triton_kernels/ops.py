"""The Triton backend's launchers as ``torch.library`` operators (``adam_mini_kernels::triton_*``),
with fake implementations, so that ``torch.compile`` traces a step that calls them as opaque,
in-place nodes (see [Note: eager launches] in ``launch.py``). Same schemas as the CUDA
extension's operators, plus the coefficient kernel."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .. import op_checks
from . import launch

LAUNCHERS = SimpleNamespace(
    step_coefficients=launch.step_coefficients,
    rows_step=launch.rows_step,
    large_blocks_step=launch.large_blocks_step,
    adam_step=launch.adam_step,
)


@torch.library.custom_op("adam_mini_kernels::triton_step_coefficients", mutates_args=("steps", "coef"))
def _step_coefficients(
    steps: torch.Tensor,
    hparams: torch.Tensor,
    coef: torch.Tensor,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    round_seed: int,
    stochastic_rounding: bool,
) -> None:
    launch.step_coefficients(steps, hparams, coef, active, inv_scale, found_inf, round_seed, stochastic_rounding)


@_step_coefficients.register_fake
def _(steps, hparams, coef, active, inv_scale, found_inf, round_seed, stochastic_rounding):
    op_checks.check_coefficients("triton_step_coefficients", steps, hparams, coef, active, inv_scale, found_inf, round_seed)


@torch.library.custom_op("adam_mini_kernels::triton_rows_step", mutates_args=("p", "m", "v"))
def _rows_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor,
               rows: torch.Tensor, width: int, stochastic_rounding: bool) -> None:
    launch.rows_step(p, g, m, v, coef, rows, width, stochastic_rounding)


@_rows_step.register_fake
def _(p, g, m, v, coef, rows, width, stochastic_rounding):
    op_checks.check_rows("triton_rows_step", p, g, m, v, coef, rows, width, stochastic_rounding)


@torch.library.custom_op("adam_mini_kernels::triton_large_blocks_step", mutates_args=("p", "m", "v", "partial"))
def _large_blocks_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor,
                       tiles: torch.Tensor, blocks: torch.Tensor, partial: torch.Tensor, stochastic_rounding: bool) -> None:
    launch.large_blocks_step(p, g, m, v, coef, tiles, blocks, partial, stochastic_rounding)


@_large_blocks_step.register_fake
def _(p, g, m, v, coef, tiles, blocks, partial, stochastic_rounding):
    op_checks.check_large_blocks("triton_large_blocks_step", p, g, m, v, coef, tiles, blocks, partial, stochastic_rounding)


@torch.library.custom_op("adam_mini_kernels::triton_adam_step", mutates_args=("p", "m", "v"))
def _adam_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor,
               tiles: torch.Tensor, stochastic_rounding: bool) -> None:
    launch.adam_step(p, g, m, v, coef, tiles, stochastic_rounding)


@_adam_step.register_fake
def _(p, g, m, v, coef, tiles, stochastic_rounding):
    op_checks.check_adam("triton_adam_step", p, g, m, v, coef, tiles, stochastic_rounding)


OPERATORS = SimpleNamespace(
    step_coefficients=_step_coefficients,
    rows_step=_rows_step,
    large_blocks_step=_large_blocks_step,
    adam_step=_adam_step,
)
