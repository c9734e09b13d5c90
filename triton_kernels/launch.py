"""The Triton backend's step: launches the kernels of ``kernels.py`` over the group's launch
tables (``adam_mini_kernels.launch_tables``), a fixed number of launches per group.

The launchers below take tensors only, with the schemas of the CUDA extension's operators, and
are also registered as operators (``ops.py``) so that ``torch.compile`` can trace a step that
calls them. [Note: eager launches] An eager step calls the launchers directly: going through the
dispatcher costs about 10 us of Python per call, which a launch-bound step cannot afford; under
``torch.compile`` the operators are called instead, as opaque nodes of the graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor

from ..buffers import FlatGroup
from ..dispatch import BackendStep
from ..launch_tables import ADAM_TILE, TILE, fused_sums, fused_update
from ..quantization import QBLOCK
from . import kernels as K

CHUNK = 1024  # tile sums added per iteration when reducing a large block
COEF_BLOCK = 1024  # parameters per program of the coefficient kernel

# [Note: FMA contraction] Every launch asks for ``a * b + c`` to be contracted into fused
# multiply-adds, rather than taking Triton's default: that default is on up to 3.9 (which warns
# on every first compilation that 3.10 turns it off) and the TRITON_DEFAULT_FP_FUSION variable
# changes it. Asking makes the kernels' rounding the same on every Triton version and the same as
# the CUDA backend's (setup.py pins nvcc's --fmad=true), so the fused backends differ from the
# PyTorch backend by summation order and contraction only. Triton's own debugging switch
# TRITON_FORCE_DISABLE_FP_FUSION still turns it off. The interpreter ignores launch options.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device when it is not (else a no-op).

    [Note: launch device] Triton launches on the current device's current stream, not on the
    tensors' device (the CUDA extension guards each launch itself): parameters on cuda:1 stepped
    while cuda:0 is current would run unordered with their backward, on the wrong device. The
    eager step enters it once per half of a group's step, each operator once per call (``ops.py``): a compiled
    graph is guarded by Inductor, but not under other compile backends (e.g. ``aot_eager``)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _warps(block: int) -> int:
    return min(16, max(1, block // 512))


def step_coefficients(
    steps: Tensor,
    hparams: Tensor,
    coef: Tensor,
    active: Optional[Tensor],
    inv_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    clip: Optional[Tensor],
    round_seed: int,
    stochastic_rounding: bool,
) -> None:
    """Advance the step counters and write this step's coefficient table into ``coef`` in one
    launch (the table of ``coefficients.next_step_coefficients``)."""
    n = steps.shape[0]
    amp = inv_scale is not None or found_inf is not None
    if amp:
        inv_scale = torch.ones((), device=steps.device) if inv_scale is None else inv_scale
        found_inf = torch.zeros((), device=steps.device) if found_inf is None else found_inf
    K.step_coefficients_kernel[(triton.cdiv(n, COEF_BLOCK),)](
        steps, steps if active is None else active, hparams, coef,
        inv_scale if amp else coef, found_inf if amp else coef, coef if clip is None else clip, n, round_seed,
        HAS_ACTIVE=active is not None, HAS_AMP=amp, HAS_CLIP=clip is not None, ROUNDING=stochastic_rounding,
        BLOCK=COEF_BLOCK, num_warps=4, **LAUNCH_OPTIONS,
    )


def rows_step(
    p: Tensor, g: Tensor, m: Tensor, m_scales: Tensor, v: Tensor, coef: Tensor, rows: Tensor, width: int,
    stochastic_rounding: bool,
) -> None:
    """Small blocks of at most ``width`` elements, one program per row of ``rows``; ``m_scales``
    are the quantization scales of an int8 ``m`` (read and written only then)."""
    K.rows_step_kernel[(rows.shape[0],)](
        p, g, m, m_scales, v, coef, rows,
        BLOCK=width, QCHUNK=min(width, QBLOCK), ROUNDING=stochastic_rounding, num_warps=_warps(width),
        **LAUNCH_OPTIONS,
    )


def large_blocks_sumsq(
    g: Tensor, inv_scale: Optional[Tensor], tiles: Tensor, blocks: Tensor, partial: Tensor, block_sums: Tensor
) -> None:
    """Large blocks, first half: each tile's sum of (g * inv_scale)^2 (AMP's 1 / scale, or 1)
    into ``partial``, then each block's (a fixed-order sum of its tiles') into ``block_sums``
    (two launches)."""
    K.tile_sumsq_kernel[(tiles.shape[0],)](
        g, g if inv_scale is None else inv_scale, tiles, partial,
        HAS_AMP=inv_scale is not None, TILE=TILE, num_warps=8, **LAUNCH_OPTIONS,
    )
    K.block_sumsq_kernel[(blocks.shape[0],)](
        partial, blocks, block_sums, CHUNK=CHUNK, num_warps=4, **LAUNCH_OPTIONS
    )


def large_blocks_update(
    p: Tensor, g: Tensor, m: Tensor, m_scales: Tensor, v: Tensor, coef: Tensor, tiles: Tensor, blocks: Tensor,
    block_sums: Tensor, stochastic_rounding: bool,
) -> None:
    """Large blocks, second half: each block's v from ``block_sums``, then m and p of every tile
    (two launches)."""
    K.large_block_v_kernel[(blocks.shape[0],)](v, coef, block_sums, blocks, num_warps=1, **LAUNCH_OPTIONS)
    K.tile_step_kernel[(tiles.shape[0],)](
        p, g, m, m_scales, v, coef, tiles, blocks, TILE=TILE, ROUNDING=stochastic_rounding, num_warps=8,
        **LAUNCH_OPTIONS,
    )


def adam_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: Tensor, tiles: Tensor, stochastic_rounding: bool) -> None:
    """Adam blocks (one v per element), one program per Adam tile."""
    K.adam_step_kernel[(tiles.shape[0],)](
        p, g, m, v, coef, tiles, TILE=ADAM_TILE, ROUNDING=stochastic_rounding, num_warps=4, **LAUNCH_OPTIONS
    )


def _through_kernels(fused, group: FlatGroup, *args):
    """``fused(group, ops, *args)`` (``launch_tables.fused_sums`` or ``fused_update``) with the
    Triton kernels: their operators under ``torch.compile``, each entering the device itself when
    it runs, else the launchers on the group's device (see [Note: eager launches])."""
    from . import ops  # registers the operators on first use

    if torch.compiler.is_compiling():
        return fused(group, ops.OPERATORS, *args)
    with on_device(group.device):
        return fused(group, ops.LAUNCHERS, *args)


def triton_sums(group: FlatGroup, inv_scale: Optional[torch.Tensor] = None):
    """The large blocks' sums of g^2 with the Triton kernels (see ``launch_tables.fused_sums``)."""
    return _through_kernels(fused_sums, group, inv_scale)


def triton_update(
    group: FlatGroup,
    sums,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> None:
    """The rest of the step of ``group`` in place with the Triton kernels (see
    ``launch_tables.fused_update``); ``active`` flags the parameters that have a gradient (None:
    all); ``inv_scale``/``found_inf`` from AMP and ``clip`` from max_grad_norm, or None."""
    _through_kernels(fused_update, group, sums, active, inv_scale, found_inf, clip)


triton_step = BackendStep(triton_sums, triton_update)
