"""The PyTorch backend: one Adam-mini step over a group's flat buffers with plain tensor ops.

A fixed number of ops per group whatever the number of parameters: the per-block sums of g^2 are
one ``segment_reduce`` over the flat gradient, and per-block / per-parameter values are spread to
elements with ``repeat_interleave``. Runs wherever PyTorch runs; it is the fallback of ``auto``
and the flat-buffer counterpart of ``reference.adam_mini_step``. Math in float32, whatever the
storage dtype. It trades memory for simplicity: a few float32 temporaries the size of the group.
An int8 group (``state_dtype=torch.int8``) dequantizes ``m``, updates it in float32 and
requantizes it (``_dequantize_m``, ``_requantize_m``): the format of quantization.py, linear codes
rounded to nearest, with the same float32 operations, so the result is bitwise the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .buffers import FlatGroup
from .dispatch import BackendStep
from .quantization import CODE_MAX, code_max, to_codes
from .rounding import MOMENT_STREAM, keys_from_float, random_bits, stochastic_round_to_bf16
from .coefficients import (
    C_BC2_SQRT,
    C_BETA2,
    C_CLIP,
    C_DECAY,
    C_EPS,
    C_GRAD_SCALE,
    C_M_WEIGHT,
    C_ROUND_KEY,
    C_STEP_SIZE,
    C_V_WEIGHT,
    next_step_coefficients,
)


@dataclass
class _SegmentTable:
    """Launch metadata of this backend, built once per group.

    The flat buffer is cut into one segment per block, in order; the padding after a parameter is
    appended to its last block's segment (it is zero, so sums do not change)."""

    seg_len: torch.Tensor  # (B,) int64: elements of each block's segment, padding included
    seg_offsets: torch.Tensor  # (B + 1,) int64: where each segment starts, then the end
    block_numel: torch.Tensor  # (B,) float32: true block size, at least 1 (empty blocks: mean 0)
    block_param: torch.Tensor  # (B,) int64: index of the parameter owning each block
    chunk_lengths: Optional[torch.Tensor] = None  # (C,) int64, int8 groups: quantization chunks
    chunk_offsets: Optional[torch.Tensor] = None  # (C + 1,) int64, int8 groups: their starts, then the end
    chunk_param: Optional[torch.Tensor] = None  # (C,) int64, int8 groups: each chunk's parameter
    code_max: Optional[torch.Tensor] = None  # 0-dim float32, int8 groups: 127 to divide by on the device
    index: Optional[torch.Tensor] = None  # (n,) int64 flat element indices (stochastic rounding)


def _segment_table(group: FlatGroup) -> _SegmentTable:
    t = group.table
    num_blocks = t["num_blocks"]
    block_param = torch.repeat_interleave(torch.arange(len(num_blocks), device=group.device), num_blocks)
    if group.sharded is None:
        block_numel = group.block_sizes
        seg_len = block_numel.clone()
    else:  # local segments of shards; the mean divides by the global block size
        block_numel, seg_len = group.sharded.divisors, group.sharded.segment_sizes.clone()
    pad = t["padded_numel"] - t["numel"]
    last_block = torch.cumsum(num_blocks, 0) - 1
    has_blocks = num_blocks > 0
    seg_len.index_add_(0, last_block[has_blocks], pad[has_blocks])
    chunk_lengths = group.quantization_chunk_lengths() if group.quantized else None
    return _SegmentTable(
        seg_len=seg_len,
        seg_offsets=_offsets(seg_len),
        block_numel=block_numel.clamp(min=1).to(torch.float32),
        block_param=block_param,
        chunk_lengths=chunk_lengths,
        chunk_offsets=None if chunk_lengths is None else _offsets(chunk_lengths),
        chunk_param=_chunk_param(group) if group.quantized else None,
        code_max=code_max(group.device) if group.quantized else None,
    )


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Segment boundaries for ``torch.segment_reduce(offsets=...)``: 0, then the running sums."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _chunk_param(group: FlatGroup) -> torch.Tensor:
    """The parameter of each quantization chunk of an int8 group."""
    starts = torch.tensor(group.scale_offsets + [len(group.m_scales)], device=group.device)
    return torch.repeat_interleave(torch.arange(len(group.params), device=group.device), starts.diff())


def _table(group: FlatGroup) -> _SegmentTable:
    seg = group.cache.get("torch")
    if seg is None:
        seg = group.cache["torch"] = _segment_table(group)
    return seg


def _work_dtype(group: FlatGroup) -> torch.dtype:
    """float32 math, float64 for float64 storage (computing it in float32 would round every
    parameter, those without a gradient too); v and the coefficients are float32 either way."""
    return torch.promote_types(group.param_buffer.dtype, torch.float32)


def _unscaled_grad(group: FlatGroup, inv_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient in the working dtype, unscaled by AMP's ``inv_scale`` before anything uses
    it: see [Note: gradient multiplier] in coefficients.py (GRAD_SCALE is AMP's 1 / scale or 0,
    so the update uses it only to tell idle parameters)."""
    work = _work_dtype(group)
    g = group.grad_buffer.to(work)
    if inv_scale is not None:
        g = g * inv_scale.to(work)  # not in place: g may be the gradient buffer itself
    return g


def torch_sums(group: FlatGroup, inv_scale: Optional[torch.Tensor] = None):
    """Every block's sum of g^2 (float32, one ``segment_reduce``), with the reducer of a sharded
    group's split blocks (see ``dispatch.BackendStep``) and, for a group that is not sharded
    (stepped right after: ``AdamMini.step``), the unscaled gradient for its update. A sharded
    group's update reads the gradient again: holding it until every group's sums are taken would
    hold a float32 copy of every sharded group's gradients at once."""
    g = _unscaled_grad(group, inv_scale)
    block_sum = _segment_reduce(g * g, "sum", _table(group).seg_offsets).float()
    if group.sharded is None:
        return block_sum, None, g
    return block_sum, group.sharded.reduce_split, None


def torch_update(
    group: FlatGroup,
    sums,
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> None:
    """The rest of the step of ``group`` in place, after ``torch_sums`` (and the all-reduce of a
    sharded group's split blocks); ``active`` flags the parameters that have a gradient (None:
    all); ``inv_scale`` and ``found_inf`` come from AMP's GradScaler, ``clip`` from
    ``max_grad_norm`` (or None)."""
    seg, n, work = _table(group), group.numel, _work_dtype(group)
    block_sum, _, g = sums
    if g is None:
        g = _unscaled_grad(group, inv_scale)
    coef = next_step_coefficients(group, active, inv_scale, found_inf, clip)
    block_coef = coef.index_select(0, seg.block_param)
    grad_scale, clip_factor = block_coef[:, C_GRAD_SCALE], block_coef[:, C_CLIP]
    block_sum = torch.where(grad_scale == 0, 0.0, block_sum * clip_factor * clip_factor)
    v = group.v
    v.mul_(block_coef[:, C_BETA2]).add_(block_sum.div_(seg.block_numel).mul_(block_coef[:, C_V_WEIGHT]))
    h = v.sqrt().div_(block_coef[:, C_BC2_SQRT]).add_(block_coef[:, C_EPS])
    block_scale = block_coef[:, C_STEP_SIZE].div(h)
    # An idle parameter has step size 0: keep it exactly still even where h is 0 (eps = 0).
    block_scale = torch.where(block_coef[:, C_STEP_SIZE] == 0, 0.0, block_scale)

    # Spread (scale, decay, m weight, gradient multiplier, clip) from blocks to elements in one gather.
    per_block = torch.stack([block_scale, block_coef[:, C_DECAY], block_coef[:, C_M_WEIGHT], grad_scale, clip_factor], dim=1)
    scale, decay, m_weight, g_mul, g_clip = torch.repeat_interleave(per_block.to(work), seg.seg_len, dim=0, output_size=n).unbind(1)
    g = torch.where(g_mul == 0, 0.0, g).mul_(g_clip)
    m = (_dequantize_m(group, seg).to(work) if group.quantized else group.m.to(work)).lerp_(g, m_weight)
    p = group.param_buffer.to(work).mul_(decay).addcmul_(m, scale, value=-1)
    # Storage: m as int8 codes, or (16-bit m, p) rounded to nearest or stochastically.
    keys = None if group.round_seed is None else _element_keys(group, seg, block_coef[:, C_ROUND_KEY])
    if group.quantized:
        _requantize_m(group, seg, m, coef[:, C_M_WEIGHT] == 0)
    elif group.m.dtype != work:  # an m of the working dtype was updated in place
        group.m.copy_(_rounded(m, keys, seg, MOMENT_STREAM))
    if group.param_buffer.dtype != work:
        group.param_buffer.copy_(_rounded(p, keys, seg, 0))


def _segment_reduce(x: torch.Tensor, reduce: str, offsets: torch.Tensor) -> torch.Tensor:
    """``torch.segment_reduce`` over segments with the boundaries ``offsets``, also of an empty
    ``x`` (it refuses one): a rank's shards of a group can all be empty, each of its segments then
    holds 0. ``unsafe=True``: the checks it skips (lengths >= 0, summing to ``len(x)``) read two
    values back to the host, a sync per call; the table was built to hold them."""
    if x.numel() == 0:
        return x.new_zeros(len(offsets) - 1)
    return torch.segment_reduce(x, reduce, offsets=offsets, unsafe=True)


def _element_keys(group: FlatGroup, seg: _SegmentTable, block_keys: torch.Tensor) -> torch.Tensor:
    """Every element's stochastic rounding key (from its block's), for a bfloat16 group; see
    [Note: stochastic rounding] in rounding.py."""
    if seg.index is None:
        seg.index = torch.arange(group.numel, device=group.device)
    return torch.repeat_interleave(keys_from_float(block_keys), seg.seg_len, output_size=group.numel)


def _rounded(x: torch.Tensor, keys: Optional[torch.Tensor], seg: _SegmentTable, stream: int) -> torch.Tensor:
    """float32 ``x`` ready to copy into its 16-bit buffer: as is (round to nearest on the copy),
    or rounded stochastically to bfloat16 with ``stream``'s bits."""
    return x if keys is None else stochastic_round_to_bf16(x, random_bits(keys, seg.index, stream))


def _dequantize_m(group: FlatGroup, seg: _SegmentTable) -> torch.Tensor:
    """The float32 first moment of an int8 group: code * its chunk's scale / 127."""
    scales = torch.repeat_interleave(group.m_scales, seg.chunk_lengths, output_size=group.numel)
    return group.m.float().mul_(scales).div_(seg.code_max)  # correctly rounded: see quantization.code_max


def _requantize_m(group: FlatGroup, seg: _SegmentTable, m: torch.Tensor, idle: torch.Tensor) -> None:
    """Store float32 ``m`` of an int8 group as codes and scales: absmax per chunk, linear codes
    rounded to nearest (padding is 0 and stays code 0; a non-finite chunk's codes are 0); the
    chunks of idle parameters (``idle``, per parameter) keep theirs. See [Note: non-finite int8 m]
    and [Note: idle int8 m] in quantization.py. ``m`` is overwritten (by the codes)."""
    n = group.numel
    scales = _segment_reduce(m.abs(), "max", seg.chunk_offsets)
    idle_chunk = idle.index_select(0, seg.chunk_param)
    divisor = torch.repeat_interleave(torch.where(scales == 0, 1.0, scales), seg.chunk_lengths, output_size=n)
    codes = to_codes(m.mul_(CODE_MAX).div_(divisor).round_())
    group.m_scales.copy_(torch.where(idle_chunk, group.m_scales, scales))
    group.m.copy_(torch.where(torch.repeat_interleave(idle_chunk, seg.chunk_lengths, output_size=n), group.m, codes))


torch_step = BackendStep(torch_sums, torch_update)
