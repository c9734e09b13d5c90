"""Per-parameter step coefficients, computed on the device from the step counters.

[Note: coefficient table]
The scalar part of an Adam-mini step (bias corrections, the step size, decoupled weight decay)
depends only on a parameter's hyperparameters and its step counter. It is computed once per step
for the whole group, in float64 (as official computes it in Python doubles) and rounded once to
float32, into a table every backend's kernels read. ``next_step_coefficients`` computes it with a
fixed number of tensor ops on P-length vectors; a backend may compute the same table with a
kernel of its own (one launch instead of about twenty), tested against this one.

A parameter that has no gradient this step ("idle") gets coefficients that leave it exactly as it
was: no decay, zero step size, v kept (beta2 = 1, weight 0), m kept (lerp weight 0).
"""

from __future__ import annotations

from typing import Optional

import torch

from .buffers import HP_BETA1, HP_BETA2, HP_EPS, HP_LR, HP_WEIGHT_DECAY, FlatGroup

# Columns of the float32 coefficient table, one row per parameter.
C_DECAY = 0  # p <- p * DECAY                          (1 - lr * wd, or 1)
C_STEP_SIZE = 1  # p <- p - STEP_SIZE * m / h          (lr / (1 - beta1^t))
C_BC2_SQRT = 2  # h = sqrt(v) / BC2_SQRT + EPS         (sqrt(1 - beta2^t))
C_EPS = 3
C_BETA2 = 4  # v <- BETA2 * v + V_WEIGHT * mean(g^2)
C_V_WEIGHT = 5  # 1 - beta2
C_M_WEIGHT = 6  # m <- m + M_WEIGHT * (g - m)          (1 - beta1)
NUM_COEFFICIENTS = 7


def advance_steps(group: FlatGroup, active: Optional[torch.Tensor]) -> None:
    """Increment the step counter of every parameter that has a gradient this step."""
    if active is None:
        group.steps.add_(1)
    else:
        group.steps.add_(active)


def step_coefficients(group: FlatGroup, active: Optional[torch.Tensor]) -> torch.Tensor:
    """The (P, NUM_COEFFICIENTS) float32 table for this step; call after ``advance_steps``."""
    hp = group.hparams
    lr, wd, beta1, beta2, eps = (hp[:, k] for k in (HP_LR, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS))
    t = group.steps.to(torch.float64)
    decay = torch.where(wd > 0, 1 - lr * wd, torch.ones_like(lr))
    step_size = lr / (1 - beta1.pow(t))
    bc2_sqrt = (1 - beta2.pow(t)).sqrt()
    v_weight = 1 - beta2
    m_weight = 1 - beta1
    if active is not None:
        zero, one = torch.zeros_like(lr), torch.ones_like(lr)
        decay = torch.where(active, decay, one)
        step_size = torch.where(active, step_size, zero)
        bc2_sqrt = torch.where(active, bc2_sqrt, one)
        beta2 = torch.where(active, beta2, one)
        v_weight = torch.where(active, v_weight, zero)
        m_weight = torch.where(active, m_weight, zero)
    table = torch.stack([decay, step_size, bc2_sqrt, eps, beta2, v_weight, m_weight], dim=1)
    return table.to(torch.float32)


def next_step_coefficients(group: FlatGroup, active: Optional[torch.Tensor]) -> torch.Tensor:
    """Advance the step counters and return this step's coefficient table."""
    advance_steps(group, active)
    return step_coefficients(group, active)
