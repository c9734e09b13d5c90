"""What the fake (meta) implementations of the kernel operators check, for both fused backends.

The operators (``torch.ops.adam_mini_kernels.*``: the CUDA extension's, registered in
``csrc/bindings.cpp``, and the Triton backend's ``triton_*``, registered in
``triton_kernels/ops.py``) mutate their arguments in place and return nothing, so a fake
implementation only checks what it can see without data (shapes, dtypes, devices), as the real
launchers do, and returns None.
"""

from __future__ import annotations

import torch

from . import coefficients, launch_tables
from .buffers import NUM_HPARAMS
from .rounding import SEED_BOUND

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of p and g (fp32 math)


def check_on_device(op: str, name: str, t, like, like_name: str = "p") -> None:
    """``t`` (skipped when None) on the device of ``like`` (named ``like_name``), as the launchers' check_on_device."""
    if t is not None:
        torch._check(t.device == like.device, lambda: f"adam_mini_kernels::{op}: {name} is on {t.device}, {like_name} on {like.device}")


def check_state(op: str, p, g, m, m_scales, v, coef) -> None:
    torch._check(p.dim() == 1, lambda: f"adam_mini_kernels::{op}: p must be 1-D, got {p.dim()}-D")
    torch._check(
        p.dtype in STORAGE_DTYPES,
        lambda: f"adam_mini_kernels::{op}: p must be float32, bfloat16 or float16, got {p.dtype}",
    )
    for name, t in (("g", g), ("m", m)):
        # m may also be float32 (state for 16-bit params), or int8 codes where the operator takes
        # m_scales (None: the Adam tiles, never int8).
        other_m = name == "m" and (t.dtype == torch.float32 or (t.dtype == torch.int8 and m_scales is not None))
        torch._check(t.dtype == p.dtype or other_m, lambda: f"adam_mini_kernels::{op}: {name} has dtype {t.dtype}, p {p.dtype}")
        torch._check(t.shape == p.shape, lambda: f"adam_mini_kernels::{op}: {name} has shape {t.shape}, p {p.shape}")
    if m_scales is not None:
        check_scales(op, m, m_scales)
    torch._check(v.dim() == 1 and v.dtype == torch.float32, lambda: f"adam_mini_kernels::{op}: v must be 1-D float32")
    torch._check(
        coef.dim() == 2 and coef.shape[1] == coefficients.NUM_COEFFICIENTS and coef.dtype == torch.float32,
        lambda: f"adam_mini_kernels::{op}: coef must be a float32 (P, {coefficients.NUM_COEFFICIENTS}) table",
    )
    for name, t in (("g", g), ("m", m), ("m_scales", m_scales), ("v", v), ("coef", coef)):
        check_on_device(op, name, t, p)


def check_scales(op: str, m, m_scales) -> None:
    """``m_scales``: float32, 1-D; one scale per quantization chunk for int8 ``m`` (the launch
    tables index it), and unused otherwise (empty by convention)."""
    torch._check(
        m_scales.dim() == 1 and m_scales.dtype == torch.float32,
        lambda: f"adam_mini_kernels::{op}: m_scales must be a 1-D float32 tensor, got {m_scales.dtype} of shape {tuple(m_scales.shape)}",
    )
    torch._check(
        m.dtype != torch.int8 or m_scales.shape[0] >= 1,
        lambda: f"adam_mini_kernels::{op}: int8 m needs its quantization scales, m_scales is empty",
    )


def check_rounding(op: str, p, stochastic_rounding: bool) -> None:
    torch._check(
        not stochastic_rounding or p.dtype == torch.bfloat16,
        lambda: f"adam_mini_kernels::{op}: stochastic_rounding needs bfloat16 p, got {p.dtype}",
    )


def check_table(op: str, name: str, table, cols: int, like, like_name: str = "p") -> None:
    """A launch table: int64 (n, ``cols``), on the device of ``like`` (p, or g for the sums)."""
    torch._check(
        table.dim() == 2 and table.shape[1] == cols and table.dtype == torch.int64,
        lambda: f"adam_mini_kernels::{op}: {name} must be an int64 (n, {cols}) launch table",
    )
    check_on_device(op, name, table, like, like_name)


def check_rows(op: str, p, g, m, m_scales, v, coef, rows, width, stochastic_rounding) -> None:
    check_state(op, p, g, m, m_scales, v, coef)
    check_rounding(op, p, stochastic_rounding)
    check_table(op, "rows", rows, launch_tables.ROW_COLS, p)
    torch._check(
        1 <= width <= launch_tables.ROW_MAX,
        lambda: f"adam_mini_kernels::{op}: width must be in [1, {launch_tables.ROW_MAX}], got {width}",
    )


def check_sums(op: str, name: str, sums, table, what: str) -> None:
    torch._check(
        sums.dtype == torch.float32 and sums.dim() == 1 and sums.shape[0] >= table.shape[0],
        lambda: f"adam_mini_kernels::{op}: {name} must be float32 with one slot per {what}",
    )
    check_on_device(op, name, sums, table, f"{what}s")


def check_scalar(op: str, name: str, t, like, like_name: str) -> None:
    """``t`` is None or a one-element float32 tensor on ``like``'s device (AMP's and clipping's
    factors)."""
    torch._check(
        t is None or (t.numel() == 1 and t.dtype == torch.float32),
        lambda: f"adam_mini_kernels::{op}: {name} must be a one-element float32 tensor",
    )
    check_on_device(op, name, t, like, like_name)


def check_large_blocks_sumsq(op: str, g, inv_scale, tiles, blocks, partial, block_sums) -> None:
    torch._check(
        g.dtype in STORAGE_DTYPES, lambda: f"adam_mini_kernels::{op}: g must be float32, bfloat16 or float16, got {g.dtype}"
    )
    check_scalar(op, "inv_scale", inv_scale, g, "g")
    check_table(op, "tiles", tiles, launch_tables.TILE_COLS, g, "g")
    check_table(op, "blocks", blocks, launch_tables.LB_COLS, g, "g")
    check_sums(op, "partial", partial, tiles, "tile")
    check_sums(op, "block_sums", block_sums, blocks, "block")
    torch._check(g.dim() == 1, lambda: f"adam_mini_kernels::{op}: g must be 1-D, got {g.dim()}-D")


def check_large_blocks_update(op: str, p, g, m, m_scales, v, coef, tiles, blocks, block_sums, stochastic_rounding) -> None:
    check_state(op, p, g, m, m_scales, v, coef)
    check_rounding(op, p, stochastic_rounding)
    check_table(op, "tiles", tiles, launch_tables.TILE_COLS, p)
    check_table(op, "blocks", blocks, launch_tables.LB_COLS, p)
    check_sums(op, "block_sums", block_sums, blocks, "block")


def check_adam(op: str, p, g, m, v, coef, tiles, stochastic_rounding) -> None:
    check_state(op, p, g, m, None, v, coef)
    check_rounding(op, p, stochastic_rounding)
    check_table(op, "tiles", tiles, launch_tables.ROW_COLS, p)


def check_coefficients(op: str, steps, hparams, coef, active, inv_scale, found_inf, clip, round_seed, stochastic_rounding) -> None:
    torch._check(steps.dim() == 1 and steps.dtype == torch.int64, lambda: f"adam_mini_kernels::{op}: steps must be 1-D int64")
    n = steps.shape[0]
    torch._check(
        hparams.dim() == 2 and hparams.shape[0] == n and hparams.shape[1] == NUM_HPARAMS and hparams.dtype == torch.float64,
        lambda: f"adam_mini_kernels::{op}: hparams must be a float64 (P, {NUM_HPARAMS}) table",
    )
    torch._check(
        coef.dim() == 2 and coef.shape[0] == n and coef.shape[1] == coefficients.NUM_COEFFICIENTS and coef.dtype == torch.float32,
        lambda: f"adam_mini_kernels::{op}: coef must be a float32 (P, {coefficients.NUM_COEFFICIENTS}) table",
    )
    torch._check(
        active is None or (active.shape == steps.shape and active.dtype == torch.bool),
        lambda: f"adam_mini_kernels::{op}: active must be a bool tensor like steps",
    )
    for name, t in (("inv_scale", inv_scale), ("found_inf", found_inf), ("clip", clip)):
        check_scalar(op, name, t, steps, "steps")
    for name, t in (("hparams", hparams), ("coef", coef), ("active", active)):
        check_on_device(op, name, t, steps, "steps")
    torch._check(0 <= round_seed < SEED_BOUND, lambda: f"adam_mini_kernels::{op}: round_seed must be in [0, 2^31)")
