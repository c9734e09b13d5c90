"""The math of one Adam-mini step for one parameter, written to be read.

Every backend is tested against this function. It follows official ``adam-mini`` 1.1.1 (the
formulas in ../shared/SPEC.md section 2) with the block layout given explicitly: the flattened
(row-major) parameter is cut into consecutive blocks, of equal size by default or of the sizes
``block_sizes`` gives, and ``v`` holds one value per block (blocks of 1 element are plain Adam).
A parameter stored by columns (``BlockLayout.columns``) is stepped by passing its transpose.
Math in float32 (float64 for float64 parameters); ``v`` float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

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
    block_sizes: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> None:
    """Update ``param``, ``m`` (same numel as param) and ``v`` (one float per block) in place.

    ``step`` is the step number after incrementing, so the first step is 1. ``block_sizes``: the
    number of elements of each block, in order (default: ``v.numel()`` equal blocks)."""
    num_blocks = v.numel()
    if num_blocks == 0:
        return
    if block_sizes is None:
        block_sizes = [param.numel() // num_blocks] * num_blocks
    sizes = torch.as_tensor(block_sizes, dtype=torch.int64).cpu()
    work = torch.promote_types(param.dtype, torch.float32)
    g = grad.detach().to(work).reshape(-1)
    p = param.detach().to(work).reshape(-1)
    m_new = m.to(work).reshape(-1)
    v_new = v.float().reshape(num_blocks)

    # Second moment: one value per block, the mean of g^2 over the block (0 for an empty block).
    block_of_element = torch.repeat_interleave(torch.arange(num_blocks), sizes).to(g.device)
    block_sum = torch.zeros(num_blocks, dtype=work, device=g.device).index_add_(0, block_of_element, g * g)
    block_mean = block_sum.float() / sizes.clamp(min=1).to(g.device)
    v_new = beta2 * v_new + (1 - beta2) * block_mean

    # Decoupled weight decay, then the first moment per element.
    if weight_decay > 0:
        p = p * (1 - lr * weight_decay)
    m_new = m_new + (1 - beta1) * (g - m_new)

    # Bias-corrected update; every element of a block shares the block's h.
    h = v_new.sqrt() / math.sqrt(1 - beta2**step) + eps
    step_size = lr / (1 - beta1**step)
    p = p - step_size * m_new / h[block_of_element]

    param.copy_(p.reshape(param.shape))
    m.copy_(m_new.reshape(m.shape))
    v.copy_(v_new.reshape(v.shape))
