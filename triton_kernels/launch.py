"""The Triton backend's step: launches the kernels of ``kernels.py`` over the group's launch
tables (``adam_mini_kernels.launch_tables``), a fixed number of launches per group."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..buffers import FlatGroup
from ..coefficients import NUM_COEFFICIENTS
from ..launch_tables import ADAM_TILE, TILE, build_launch_tables
from . import kernels as K

CHUNK = 1024  # tile sums added per iteration when reducing a large block
COEF_BLOCK = 1024  # parameters per program of the coefficient kernel


def _warps(block: int) -> int:
    return min(16, max(1, block // 512))


def step_coefficients(
    group: FlatGroup,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advance the step counters and compute this step's coefficient table in one launch (the
    table of ``coefficients.next_step_coefficients``)."""
    coef = group.cache.get("coef")
    if coef is None:
        coef = group.cache["coef"] = torch.empty(len(group.params), NUM_COEFFICIENTS, dtype=torch.float32, device=group.device)
    n = len(group.params)
    amp = inv_scale is not None or found_inf is not None
    if amp:
        inv_scale = torch.ones((), device=group.device) if inv_scale is None else inv_scale
        found_inf = torch.zeros((), device=group.device) if found_inf is None else found_inf
    K.step_coefficients_kernel[(triton.cdiv(n, COEF_BLOCK),)](
        group.steps, group.steps if active is None else active, group.hparams, coef,
        inv_scale if amp else coef, found_inf if amp else coef, n, group.round_seed or 0,
        HAS_ACTIVE=active is not None, HAS_AMP=amp, ROUNDING=group.round_seed is not None,
        BLOCK=COEF_BLOCK, num_warps=4,
    )
    return coef


def triton_step(
    group: FlatGroup,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Apply one step to ``group`` in place with the Triton kernels; ``active`` flags the
    parameters that have a gradient (None: all); ``inv_scale``/``found_inf`` from AMP, or None."""
    coef = step_coefficients(group, active, inv_scale, found_inf)
    t = group.cache.get("launch_tables")
    if t is None:
        t = group.cache["launch_tables"] = build_launch_tables(group)
    p, g, m, v = group.param_buffer, group.grad_buffer, group.m, group.v
    rounding = group.round_seed is not None
    for block, rows in t.row_classes:
        K.rows_step_kernel[(rows.shape[0],)](
            p, g, m, v, coef, rows, BLOCK=block, ROUNDING=rounding, num_warps=_warps(block)
        )
    if t.tiles is not None:
        n_tiles = t.tiles.shape[0]
        K.tile_sumsq_kernel[(n_tiles,)](g, t.tiles, t.partial, TILE=TILE, num_warps=8)
        K.large_block_v_kernel[(t.blocks.shape[0],)](v, coef, t.partial, t.blocks, CHUNK=CHUNK, num_warps=4)
        K.tile_step_kernel[(n_tiles,)](
            p, g, m, v, coef, t.tiles, t.blocks, TILE=TILE, ROUNDING=rounding, num_warps=8
        )
    if t.adam is not None:
        K.adam_step_kernel[(t.adam.shape[0],)](
            p, g, m, v, coef, t.adam, TILE=ADAM_TILE, ROUNDING=rounding, num_warps=4
        )
