"""Block-wise 8-bit quantization of the first moment (the format of issue 10, readable).

[Note: int8 first moment]
``m`` is stored as signed 8-bit codes with one float32 scale per quantization block: consecutive
``QBLOCK`` elements of one Adam-mini block (a row, a head, a whole tensor), the last chunk of a
block possibly shorter, so that a kernel that holds a block on chip also holds its quantization
blocks. The scale is the block's largest magnitude; a code ``c`` in [-127, 127] stands for
``scale * f(c / 127)`` with one of two code maps:

* ``linear``: f(y) = y. Uniform steps of scale / 127. Computed as ``rint(m * 127 / scale)`` and
  ``c * scale / 127`` (IEEE float32, in this order in every backend): each expression ends in a
  division, which a GPU compiler cannot contract into a fused multiply-add with what follows, so
  the kernels give the same codes as this reference from the same ``m``. The divisions by 127
  are by a 0-dim tensor on the values' device (``code_max``), never by the Python number: ATen's
  CUDA kernels compute ``x / number`` as ``x * (1 / number)``, which is not correctly rounded
  (off by one ulp for about 5 % of decoded values), where the kernels divide.
* ``sqrt``: f(y) = sign(y) y^2 (codes are sqrt-companded): steps ~scale / 127^2 near zero, where
  most of m's values are, and ~2 scale / 127 near the block's maximum.

Rounding to a code is to nearest, or stochastic (unbiased in the code domain) given 8 random
bits per element. Which map and rounding the optimizer uses is chosen by measured convergence
(bench/int8_m_study.py, results in bench/results/).

``AdamMini(state_dtype=torch.int8)`` (every backend: the fused kernels requantize on chip, see
[Note: int8 first moment in the kernels] in csrc/kernels.cuh) uses linear codes rounded to
nearest, chosen by bench/NOTES.md (the 8-bit formats study, and the demo LM within 0.3 % of
float32 state on two seeds). Only parameters with at least
``INT8_MIN_NUMEL`` elements that are not Adam blocks are quantized (``int8_first_moment``): a
bias or a norm weight holds too little of the state to matter and keeps ``m`` in its own dtype.
So does a parameter whose codes and scales (1 byte per element, 4 per chunk) would not be
strictly smaller than that ``m``: blocks of 1 element in float32 (5 bytes against 4), of up to 4
in bfloat16/float16. The decision depends on the global layout and the dtype only, so every rank
of a mesh makes it alike. Parameters that keep a float ``m`` sit in flat groups of their own
(buffers.py), so that a backend steps groups that are all-int8 or all-float. Per-parameter state
(checkpoint.py) holds ``m_codes`` (int8, the parameter's shape) and ``m_scales`` (float32, flat,
chunk after chunk of the blocks in storage order) in place of ``m``. Loading a float ``m`` into
an int8 optimizer quantizes it (lossy); loading codes into a float optimizer dequantizes them
(exact into a float32 ``m``; into a bfloat16/float16 ``m``, state_dtype None with 16-bit
parameters, rounded to that dtype). Both conversions happen in ``load_state_dict``, so
``state_dict()`` before the next step already saves the loading optimizer's format. int8 ->
float32 -> int8 is not bitwise: the codes come back equal, but a requantized chunk's absmax is
``127 * scale / 127``, which for some scales is the float32 next to ``scale``
(see [Note: idle int8 m]).

[Note: non-finite int8 m]
An inf or NaN in ``m`` (an inf or NaN gradient in a step that neither AMP nor clipping skips)
makes its chunk's scale inf or NaN (the absmax propagates a NaN, in the kernels too: [Note:
NaN-propagating absmax] in csrc/kernels.cuh), and every code of the chunk 0 (``m * 127 / scale``
is 0 or NaN there, and a NaN code is defined as 0): the whole chunk decodes to NaN, never to a
finite value, as the float m stays non-finite.

[Note: idle int8 m]
A parameter without an update this step (no gradient, or a step AMP skips) must keep its state
bit for bit. Its float ``m`` does (the lerp weight is 0), but requantizing its unchanged int8
``m`` would not: the chunk's absmax is ``127 * scale / 127``, which rounds to another float32 for
about 0.4 % of scales, and they would drift by an ulp each idle step. So every backend writes
neither the codes nor the scales of a parameter whose ``m`` weight (``C_M_WEIGHT``, 1 - beta1 or
0 when idle) is 0.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

QBLOCK = 256
INT8_MIN_NUMEL = 4096  # smaller parameters keep m in their own dtype
CODE_MAX = 127
CODE_MAPS = ("linear", "sqrt")


def _chunks(x: torch.Tensor, qblock: int) -> Tuple[torch.Tensor, int]:
    """``x`` (rows, row_len) zero-padded to whole quantization blocks: (rows, chunks, qblock)."""
    rows, length = x.shape
    chunks = max(1, math.ceil(length / qblock))
    padded = torch.zeros(rows, chunks * qblock, dtype=torch.float32, device=x.device)
    padded[:, :length] = x
    return padded.view(rows, chunks, qblock), length


def to_codes(y: torch.Tensor) -> torch.Tensor:
    """Rounded code values ``y`` clamped to [-127, 127] in place, a NaN made 0 ([Note:
    non-finite int8 m]); still float (the caller casts or stores them)."""
    return y.clamp_(-CODE_MAX, CODE_MAX).nan_to_num_(nan=0.0)


def quantize(
    x: torch.Tensor, code_map: str = "linear", qblock: int = QBLOCK, random: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, x's shape) and scales (float32, (rows, chunks)) of a (rows, row_len) float
    tensor. ``random``: uniform [0, 1) per element for stochastic rounding (None: nearest)."""
    if code_map not in CODE_MAPS:
        raise ValueError(f"code_map must be one of {CODE_MAPS}, got {code_map!r}")
    blocks, length = _chunks(x.float(), qblock)
    scales = blocks.abs().amax(dim=2)
    divisor = torch.where(scales == 0, 1.0, scales)[..., None]
    if code_map == "sqrt":
        y = blocks / divisor  # in [-1, 1]
        y = y.sign() * y.abs().sqrt() * CODE_MAX
    else:
        y = blocks * CODE_MAX / divisor
    if random is None:
        codes = y.round()
    else:
        r, _ = _chunks(random, qblock)
        codes = (y + r).floor()  # unbiased: rounds up with probability frac(y)
    codes = to_codes(codes).to(torch.int8)
    return codes.flatten(1)[:, :length].reshape(x.shape), scales


def code_max(device: torch.device) -> torch.Tensor:
    """CODE_MAX as a 0-dim float32 tensor on ``device``, to divide by (see [Note: int8 first
    moment]): made by a fill, no host-to-device copy."""
    return torch.full((), float(CODE_MAX), dtype=torch.float32, device=device)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, code_map: str = "linear", qblock: int = QBLOCK) -> torch.Tensor:
    """float32 values of (rows, row_len) ``codes`` with their (rows, chunks) ``scales``."""
    blocks, length = _chunks(codes.float(), qblock)
    if code_map == "sqrt":
        y = blocks / code_max(blocks.device)
        y = y.sign() * y * y * scales[..., None]
    else:
        y = blocks * scales[..., None] / code_max(blocks.device)
    return y.flatten(1)[:, :length]


def int8_first_moment(layout, dtype: torch.dtype) -> bool:
    """Whether ``AdamMini(state_dtype=torch.int8)`` stores the ``m`` of a parameter laid out as
    ``layout`` (a ``partition.BlockLayout``) as int8 codes instead of an ``m`` of ``dtype``: large
    enough, not an Adam block, and codes plus scales strictly smaller than that ``m``."""
    if layout.numel < INT8_MIN_NUMEL or any(s.rule == "adam" for s in layout.sections):
        return False
    chunks = sum(num_blocks * max(1, math.ceil(block_numel / QBLOCK)) for block_numel, num_blocks in layout.runs)
    return layout.numel + 4 * chunks < layout.numel * dtype.itemsize


def quantize_runs(m: torch.Tensor, runs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, flat) and scales (float32, flat) of a flat first moment in storage order cut
    into blocks of ``runs`` (``(block_numel, num_blocks)`` sections, as ``BlockLayout.runs``)."""
    codes, scales, start = [], [], 0
    for block_numel, num_blocks in runs:
        part = m[start : start + block_numel * num_blocks].reshape(num_blocks, block_numel)
        c, s = quantize(part)
        codes.append(c.reshape(-1))
        scales.append(s.reshape(-1))
        start += block_numel * num_blocks
    return torch.cat(codes), torch.cat(scales)


def dequantize_runs(codes: torch.Tensor, scales: torch.Tensor, runs) -> torch.Tensor:
    """The float32 flat first moment of flat ``codes`` and ``scales`` (``quantize_runs``)."""
    out, start, s_start = [], 0, 0
    for block_numel, num_blocks in runs:
        part = codes[start : start + block_numel * num_blocks].reshape(num_blocks, block_numel)
        chunks = max(1, math.ceil(block_numel / QBLOCK))
        s = scales[s_start : s_start + num_blocks * chunks].reshape(num_blocks, chunks)
        out.append(dequantize(part, s).reshape(-1))
        start += block_numel * num_blocks
        s_start += num_blocks * chunks
    return torch.cat(out) if out else codes.new_zeros(0, dtype=torch.float32)
