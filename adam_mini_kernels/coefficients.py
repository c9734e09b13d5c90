"""Per-parameter step coefficients, computed on the device from the step counters.

[Note: coefficient table]
The scalar part of an Adam-mini step (bias corrections, the step size, decoupled weight decay)
depends only on a parameter's hyperparameters and its step counter. It is computed once per step
for the whole group, in float64 (as official computes it in Python doubles) and rounded once to
float32, into a table every backend's kernels read. ``next_step_coefficients`` computes it with a
fixed number of tensor ops on P-length vectors; a backend may compute the same table with a
kernel of its own (one launch instead of about twenty), tested against this one.

A parameter that has no gradient this step ("idle") gets coefficients that leave it exactly as it
was: no decay, zero step size, v kept (beta2 = 1, weight 0), m kept (lerp weight 0), gradient
multiplier 0. Under AMP (``torch.amp.GradScaler``) the gradient multiplier is 1 / grad_scale,
and a step whose ``found_inf`` is set makes every parameter idle, with no host sync.

[Note: gradient multiplier]
A gradient enters the step as ``(0 if GRAD_SCALE == 0 else g * GRAD_SCALE) * CLIP``: unscaled
by AMP's 1 / scale first, then clipped (``max_grad_norm``'s factor, 1 without), in the order of
``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``step()``. A block's sum of squares is taken of
the unscaled gradient and multiplied by CLIP twice (``sumsq * c * c``):

* unscaled before squaring, as torch's fused AdamW does: GradScaler's scale keeps growing while
  no inf is found (bfloat16 autocast, float32), and squares of the scaled gradients would
  overflow float32 (a sum past 3.4e38, a scaled element past 1.8e19) where the unscaled ones
  cannot. The large blocks' sums are taken before the table exists (the step all-reduces a
  sharded group's first), so their operator reads AMP's ``inv_scale`` itself.
* the clip factor after: it is known only after the norm's all-reduce for shards (see [Note:
  clipping norm of shards] in optimizer.py), and ``c * c`` of a factor below about 1e-19 (a
  global norm of 1e19 clipped to 1) would underflow float32.

The select (not a product) keeps an inf or NaN gradient of an idle or skipped parameter out of
every result; ``g * 1`` is exact, so without AMP and clipping nothing changes.

With stochastic rounding (``group.round_seed`` set) the last column holds each parameter's
rounding key: a uint32 stored as the bit pattern of a float32 (never used as a number; see
[Note: stochastic rounding] in rounding.py), salted for shards of sharded parameters
(``salt_shard_keys``, after the table is computed, on every backend). It is 0 otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch

from .buffers import HP_BETA1, HP_BETA2, HP_EPS, HP_LR, HP_WEIGHT_DECAY, FlatGroup
from .rounding import keys_as_float, keys_from_float, round_keys, shard_keys

# Columns of the float32 coefficient table, one row per parameter.
C_DECAY = 0  # p <- p * DECAY                          (1 - lr * wd, or 1)
C_STEP_SIZE = 1  # p <- p - STEP_SIZE * m / h          (lr / (1 - beta1^t))
C_BC2_SQRT = 2  # h = sqrt(v) / BC2_SQRT + EPS         (sqrt(1 - beta2^t))
C_EPS = 3
C_BETA2 = 4  # v <- BETA2 * v + V_WEIGHT * mean(g^2)
C_V_WEIGHT = 5  # 1 - beta2
C_M_WEIGHT = 6  # m <- m + M_WEIGHT * (g - m)          (1 - beta1)
C_GRAD_SCALE = 7  # g <- g * GRAD_SCALE                  (1, 1 / AMP scale, 0 when idle)
C_CLIP = 8  # g <- g * CLIP, after GRAD_SCALE        (max_grad_norm's clip factor, or 1)
C_ROUND_KEY = 9  # stochastic rounding key (uint32 bits), see rounding.py
NUM_COEFFICIENTS = 10


def effective_active(
    group: FlatGroup, active: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """``active`` with every parameter switched off when ``found_inf`` (AMP) is non-zero."""
    if found_inf is None:
        return active
    if active is None:
        active = torch.ones(len(group.params), dtype=torch.bool, device=group.device)
    return active & (found_inf.reshape(()) == 0)


def advance_steps(group: FlatGroup, active: Optional[torch.Tensor]) -> None:
    """Increment the step counter of every parameter that has a gradient this step."""
    if active is None:
        group.steps.add_(1)
    else:
        group.steps.add_(active)


def step_coefficients(
    group: FlatGroup,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The (P, NUM_COEFFICIENTS) float32 table for this step; call after ``advance_steps``.
    ``inv_scale``: 1 / the AMP loss scale, ``clip``: the clip factor (0-dim float32 device
    tensors), or None."""
    hp = group.hparams
    lr, wd, beta1, beta2, eps = (hp[:, k] for k in (HP_LR, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS))
    t = group.steps.to(torch.float64)
    decay = torch.where(wd > 0, 1 - lr * wd, torch.ones_like(lr))
    step_size = lr / (1 - beta1.pow(t))
    bc2_sqrt = (1 - beta2.pow(t)).sqrt()
    v_weight = 1 - beta2
    m_weight = 1 - beta1
    grad_scale = torch.ones_like(lr) if inv_scale is None else inv_scale.to(torch.float64).expand_as(lr)
    clip_factor = torch.ones_like(lr) if clip is None else clip.to(torch.float64).expand_as(lr)
    if active is not None:
        zero, one = torch.zeros_like(lr), torch.ones_like(lr)
        decay = torch.where(active, decay, one)
        step_size = torch.where(active, step_size, zero)
        bc2_sqrt = torch.where(active, bc2_sqrt, one)
        beta2 = torch.where(active, beta2, one)
        v_weight = torch.where(active, v_weight, zero)
        m_weight = torch.where(active, m_weight, zero)
        grad_scale = torch.where(active, grad_scale, zero)
    table = torch.stack([decay, step_size, bc2_sqrt, eps, beta2, v_weight, m_weight, grad_scale, clip_factor], dim=1)
    if group.round_seed is None:
        key = torch.zeros_like(lr, dtype=torch.float32)
    else:
        key = keys_as_float(round_keys(group.round_seed, group.steps))
    return torch.cat([table.to(torch.float32), key[:, None]], dim=1)


def salt_shard_keys(group: FlatGroup, coef: torch.Tensor) -> None:
    """Salt the rounding keys of ``coef`` (a step's table) with the parameters' shard coordinates
    (``group.shard_coords``; see [Note: stochastic rounding] in rounding.py), in place."""
    if group.shard_coords is not None:
        keys = shard_keys(keys_from_float(coef[:, C_ROUND_KEY]), group.shard_coords)
        coef[:, C_ROUND_KEY] = keys_as_float(keys)


def next_step_coefficients(
    group: FlatGroup,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advance the step counters and return this step's coefficient table (AMP: ``inv_scale``
    and ``found_inf``, clipping: ``clip``, as 0-dim tensors on the group's device, or None)."""
    active = effective_active(group, active, found_inf)
    advance_steps(group, active)
    coef = step_coefficients(group, active, inv_scale, clip)
    salt_shard_keys(group, coef)
    return coef
