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

from typing import Optional

import torch

from . import coefficients, launch_tables, rounding
from .buffers import FlatGroup
from .launch_tables import build_launch_tables

try:
    from . import _C
except ImportError as err:  # not built: a CPU-only torch, no nvcc, ADAM_MINI_SKIP_CUDA_BUILD=1, ...
    raise ImportError(f"adam_mini_kernels._C is not built or does not load: {err}") from err


def _expected_constants() -> dict:
    """The constants the kernels must have been compiled with, from their Python definitions."""
    names = (
        "ROW_START ROW_NUMEL ROW_V ROW_PARAM ROW_COLS TILE_START TILE_NUMEL TILE_BLOCK TILE_COLS "
        "LB_V LB_PARAM LB_FIRST_TILE LB_NUM_TILES LB_NUMEL LB_COLS ROW_MAX TILE ADAM_TILE"
    ).split()
    expected = {name: getattr(launch_tables, name) for name in names}
    for name in ("C_DECAY C_STEP_SIZE C_BC2_SQRT C_EPS C_BETA2 C_V_WEIGHT C_M_WEIGHT C_GRAD_SCALE C_ROUND_KEY NUM_COEFFICIENTS").split():
        expected[name] = getattr(coefficients, name)
    for name in ("MIX_MUL1", "MIX_MUL2", "GOLDEN", "MOMENT_STREAM"):
        expected[name] = getattr(rounding, name)
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

OPS = ("rows_step", "large_blocks_step", "adam_step")
_ops = torch.ops.adam_mini_kernels


# -- fake implementations --------------------------------------------------------------------------
# The operators mutate their arguments in place and return nothing, so a fake implementation only
# checks what it can see without data (shapes, dtypes, devices) and returns None.


def _check_state(op: str, p, g, m, v, coef) -> None:
    torch._check(p.dim() == 1, lambda: f"adam_mini_kernels::{op}: p must be 1-D, got {p.dim()}-D")
    torch._check(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"adam_mini_kernels::{op}: p must be float32, bfloat16 or float16, got {p.dtype}",
    )
    for name, t in (("g", g), ("m", m)):
        wide_m = name == "m" and t.dtype == torch.float32  # float32 state for 16-bit params
        torch._check(t.dtype == p.dtype or wide_m, lambda: f"adam_mini_kernels::{op}: {name} has dtype {t.dtype}, p {p.dtype}")
        torch._check(t.shape == p.shape, lambda: f"adam_mini_kernels::{op}: {name} has shape {t.shape}, p {p.shape}")
    torch._check(v.dim() == 1 and v.dtype == torch.float32, lambda: f"adam_mini_kernels::{op}: v must be 1-D float32")
    torch._check(
        coef.dim() == 2 and coef.shape[1] == coefficients.NUM_COEFFICIENTS and coef.dtype == torch.float32,
        lambda: f"adam_mini_kernels::{op}: coef must be a float32 (P, {coefficients.NUM_COEFFICIENTS}) table",
    )
    for name, t in (("g", g), ("m", m), ("v", v), ("coef", coef)):
        torch._check(t.device == p.device, lambda: f"adam_mini_kernels::{op}: {name} is on {t.device}, p on {p.device}")


def _check_rounding(op: str, p, stochastic_rounding: bool) -> None:
    torch._check(
        not stochastic_rounding or p.dtype == torch.bfloat16,
        lambda: f"adam_mini_kernels::{op}: stochastic_rounding needs bfloat16 p, got {p.dtype}",
    )


def _check_table(op: str, name: str, table, cols: int) -> None:
    torch._check(
        table.dim() == 2 and table.shape[1] == cols and table.dtype == torch.int64,
        lambda: f"adam_mini_kernels::{op}: {name} must be an int64 (n, {cols}) launch table",
    )


@torch.library.register_fake("adam_mini_kernels::rows_step")
def _rows_step_fake(p, g, m, v, coef, rows, width, stochastic_rounding):
    _check_state("rows_step", p, g, m, v, coef)
    _check_rounding("rows_step", p, stochastic_rounding)
    _check_table("rows_step", "rows", rows, launch_tables.ROW_COLS)
    torch._check(
        1 <= width <= launch_tables.ROW_MAX,
        lambda: f"adam_mini_kernels::rows_step: width must be in [1, {launch_tables.ROW_MAX}], got {width}",
    )


@torch.library.register_fake("adam_mini_kernels::large_blocks_step")
def _large_blocks_step_fake(p, g, m, v, coef, tiles, blocks, partial, stochastic_rounding):
    _check_state("large_blocks_step", p, g, m, v, coef)
    _check_rounding("large_blocks_step", p, stochastic_rounding)
    _check_table("large_blocks_step", "tiles", tiles, launch_tables.TILE_COLS)
    _check_table("large_blocks_step", "blocks", blocks, launch_tables.LB_COLS)
    torch._check(
        partial.dtype == torch.float32 and partial.dim() == 1 and partial.shape[0] >= tiles.shape[0],
        lambda: "adam_mini_kernels::large_blocks_step: partial must be float32 with one slot per tile",
    )


@torch.library.register_fake("adam_mini_kernels::adam_step")
def _adam_step_fake(p, g, m, v, coef, tiles, stochastic_rounding):
    _check_state("adam_step", p, g, m, v, coef)
    _check_rounding("adam_step", p, stochastic_rounding)
    _check_table("adam_step", "tiles", tiles, launch_tables.ROW_COLS)


# -- the step --------------------------------------------------------------------------------------


def cuda_step(
    group: FlatGroup,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Apply one step to ``group`` in place with the CUDA kernels: the coefficient table (torch
    ops), then one operator call per row class, one for the large blocks (three launches), one
    for the Adam tiles."""
    coef = coefficients.next_step_coefficients(group, active, inv_scale, found_inf)
    t = group.cache.get("launch_tables")
    if t is None:
        t = group.cache["launch_tables"] = build_launch_tables(group)
    p, g, m, v = group.param_buffer, group.grad_buffer, group.m, group.v
    rounding = group.round_seed is not None
    for width, rows in t.row_classes:
        _ops.rows_step(p, g, m, v, coef, rows, width, rounding)
    if t.tiles is not None:
        _ops.large_blocks_step(p, g, m, v, coef, t.tiles, t.blocks, t.partial, rounding)
    if t.adam is not None:
        _ops.adam_step(p, g, m, v, coef, t.adam, rounding)
