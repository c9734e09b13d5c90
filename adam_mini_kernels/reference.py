"""The math of one Adam-mini step for one parameter, written to be read.

Every backend is tested against this function. It follows official ``adam-mini`` 1.1.1 (the
formulas in ../shared/SPEC.md section 2) with the block layout given explicitly: the flattened
parameter is ``num_blocks`` consecutive chunks of ``block_numel`` elements, and ``v`` holds one
value per chunk (``block_numel == 1`` is plain Adam). Math in float32.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def adam_mini_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Update ``param``, ``m`` (same numel as param) and ``v`` (one float per block) in place.

    ``step`` is the step number after incrementing, so the first step is 1."""
    num_blocks = v.numel()
    if num_blocks == 0:
        return
    blocks = (num_blocks, param.numel() // num_blocks)
    g = grad.detach().float().reshape(blocks)
    p = param.detach().float().reshape(blocks)
    m32 = m.float().reshape(blocks)
    v32 = v.float().reshape(num_blocks)

    # Second moment: one value per block, the mean of g^2 over the block (0 for an empty block).
    block_mean = (g * g).mean(dim=1) if blocks[1] else torch.zeros_like(v32)
    v32 = beta2 * v32 + (1 - beta2) * block_mean

    # Decoupled weight decay, then the first moment per element.
    if weight_decay > 0:
        p = p * (1 - lr * weight_decay)
    m32 = m32 + (1 - beta1) * (g - m32)

    # Bias-corrected update; every element of a block shares the block's h.
    h = v32.sqrt() / math.sqrt(1 - beta2**step) + eps
    step_size = lr / (1 - beta1**step)
    p = p - step_size * m32 / h[:, None]

    param.copy_(p.reshape(param.shape))
    m.copy_(m32.reshape(m.shape))
    v.copy_(v32.reshape(v.shape))
