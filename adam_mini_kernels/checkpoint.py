"""Per-parameter optimizer state in the layout of official ``adam-mini`` 1.1.1.

``opt.state[p]`` holds, for each parameter, views into the flat buffers shaped and keyed exactly
as official keeps them, so ``state_dict()`` moves to and from the official package:

=========  ==========================================================================
kind       keys (in official's order)
=========  ==========================================================================
adam       ``m`` (param shape), ``step``, ``v`` (param shape)
heads      ``m`` (heads, head_numel), ``head_per_gpu``, ``step``, ``vmean`` (heads, 1)
rows       ``m`` (param shape), ``step``, ``neuron_per_gpu``, ``vmean`` (rows, 1)
whole      ``m`` (param shape), ``step``, ``reduced``, ``vmean`` (0-dim), ``block_numel``
blocks     ``m`` (param shape), ``step``, ``vmean`` (blocks,), ``block_runs``, ``columns``
=========  ==========================================================================

``v``/``vmean`` are float32 here whatever the parameter dtype (official keeps the param dtype).

The ``blocks`` kind is ours: layouts of ``AdamMini.for_model`` that official cannot represent
(several sections, or column blocks; see [Note: block layouts] in partition.py). ``vmean`` has
one value per block in storage order, ``block_runs`` lists ``(block_numel, num_blocks)`` per
section and ``columns`` says whether the storage order is that of the parameter with its last two
dims swapped, so that the saved second moments can be mapped onto any other partition of the
parameter (``regroup_v``). ``m`` is always in the parameter's own shape.

A parameter whose ``m`` is stored as int8 codes (``state_dtype=torch.int8``) has ``m_codes``
(int8, the parameter's shape) and ``m_scales`` (float32, flat: the chunks of its blocks in
storage order) in place of ``m``; see [Note: int8 first moment] in quantization.py.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Sequence, Tuple

import torch

from .buffers import FlatGroup, chunk_lengths
from .partition import BlockLayout, run_block_sizes, storage_shape, swap_columns
from .quantization import QBLOCK, dequantize_runs, quantize_runs


def keyed_state(layout: BlockLayout, step: Any, v: torch.Tensor, m: torch.Tensor = None,
                codes: torch.Tensor = None, scales: torch.Tensor = None) -> Dict[str, Any]:
    """The per-parameter state keyed as the table above for ``layout``: ``m`` or int8 ``codes``
    in the parameter's shape (with their flat ``scales``), ``v`` flat (one value per element for
    Adam blocks, else per block in storage order). Views stay views."""
    kind, shape, blocks = layout.state_kind, layout.shape, layout.num_blocks
    if codes is not None:
        second = {"v": v.view(shape)} if kind == "adam" else {"vmean": v}
        return {"m_codes": codes, "m_scales": scales, "step": step, **second,
                "block_runs": layout.runs, "columns": layout.columns}
    if kind == "adam":
        return {"m": m, "step": step, "v": v.view(shape)}
    if kind == "heads":
        return {"m": m.reshape(blocks, layout.block_numel), "head_per_gpu": blocks, "step": step, "vmean": v.view(blocks, 1)}
    if kind == "rows":
        return {"m": m, "step": step, "neuron_per_gpu": blocks, "vmean": v.view(blocks, 1)}
    if kind == "blocks":
        return {"m": m, "step": step, "vmean": v, "block_runs": layout.runs, "columns": layout.columns}
    return {"m": m, "step": step, "reduced": False, "vmean": v.view(()), "block_numel": float(layout.numel)}


def state_views(group: FlatGroup, i: int) -> Dict[str, Any]:
    """The per-parameter state of parameter ``i`` of ``group``, as views into its buffers."""
    layout, m = group.layouts[i], group.shaped(i, group.m_view(i))
    if group.quantized:
        return keyed_state(layout, group.step_view(i), group.v_view(i), codes=m, scales=group.m_scale_view(i))
    return keyed_state(layout, group.step_view(i), group.v_view(i), m=m)


def second_moment(state: Dict[str, Any]):
    """The second-moment tensor of a per-parameter state: ``v`` (Adam blocks) or ``vmean``."""
    return state["v"] if "v" in state else state.get("vmean")


def saved_blocks(state: Dict[str, Any], numel: int) -> Tuple[Tuple[Tuple[int, int], ...], bool]:
    """The block layout the second moments of ``state`` were saved for: ``(block_numel,
    num_blocks)`` runs over the storage order, and whether that order is the transposed one.
    Official's layouts (and ours of the same kinds) are equal chunks of the row-major tensor."""
    if "block_runs" in state:
        return tuple((int(n), int(c)) for n, c in state["block_runs"]), bool(state.get("columns", False))
    k = second_moment(state).numel()
    return ((numel // k if k else 0, k),), False


def _has_negative(values: torch.Tensor) -> bool:
    """Whether a saved tensor holds a value < 0 (one host sync). A DTensor is decided from every
    rank's shard (a sum over its mesh: a collective, as loading sharded state is), so that every
    rank refuses alike and none is left waiting in the next step's all-reduce."""
    count = (values < 0).sum()
    return bool((count.full_tensor() if hasattr(count, "full_tensor") else count) > 0)


def check_state(state: Dict[str, Any], layout: BlockLayout) -> None:
    """Raise ``ValueError`` if ``state`` (official layout or ours) cannot be loaded for a
    parameter laid out as ``layout``."""
    if "step" not in state and any(state.get(k) is not None for k in ("m", "m_codes", "v", "vmean")):
        raise ValueError(
            f"state of parameter '{layout.name}' has moments but no 'step': resumed at step 0, the "
            "next step would bias-correct the trained moments as if they were new"
        )
    if "step" in state:
        step = state["step"]
        count = step.item() if torch.is_tensor(step) and step.numel() == 1 else step
        integral = isinstance(count, numbers.Real) and not isinstance(count, bool) and math.isfinite(count)
        if not (integral and count == int(count) and count >= 0):
            raise ValueError(f"state of parameter '{layout.name}' has step {step!r}: a step count is an integer >= 0")
        has_m = state.get("m") is not None or state.get("m_codes") is not None
        second = "v" if layout.state_kind == "adam" else "vmean"
        missing = [k for k, there in (("m", has_m), (second, second_moment(state) is not None)) if not there]
        if count > 0 and missing:
            raise ValueError(
                f"state of parameter '{layout.name}' is at step {int(count)} but has no "
                f"{' or '.join(map(repr, missing))}: resumed, the next step would bias-correct a new "
                "moment as a trained one"
            )
    m = state.get("m")
    if m is not None:
        # m is the parameter's shape, or (heads, head_numel) in official's query/key layout.
        heads = state.get("head_per_gpu")
        head_shape = (heads, layout.numel // heads) if heads and layout.numel % heads == 0 else None
        if tuple(m.shape) not in (layout.shape, head_shape):
            raise ValueError(
                f"state of parameter '{layout.name}': 'm' has shape {list(m.shape)}, the parameter "
                f"has shape {list(layout.shape)}"
            )
    codes = state.get("m_codes")
    if codes is not None:
        scales = state.get("m_scales")
        if tuple(codes.shape) != layout.shape or codes.dtype != torch.int8 or not torch.is_tensor(scales):
            raise ValueError(
                f"state of parameter '{layout.name}': 'm_codes' must be int8 of the parameter's shape "
                f"{list(layout.shape)} beside a tensor 'm_scales', got {codes.dtype} {list(codes.shape)}"
            )
        if second_moment(state) is None:
            raise ValueError(f"state of parameter '{layout.name}': 'm_codes' without its second moments")
    v = second_moment(state)
    if v is None:
        return
    for key, values in (("second moments", v), ("'m_scales'", state.get("m_scales") if codes is not None else None)):
        if values is not None and _has_negative(values):
            raise ValueError(
                f"state of parameter '{layout.name}': its {key} hold negative values (means of squares, absmax "
                "scales: never negative); the checkpoint is corrupt or not an Adam-mini one"
            )
    k = v.numel()
    if "block_runs" in state:
        runs, columns = saved_blocks(state, layout.numel)
        if sum(n * c for n, c in runs) != layout.numel or sum(c for _, c in runs) != k or (columns and len(layout.shape) < 2):
            raise ValueError(
                f"state of parameter '{layout.name}': {k} second-moment values over blocks "
                f"{list(runs)} (columns={columns}) do not fit its shape {list(layout.shape)}"
            )
    elif k != layout.num_blocks and (k == 0 or layout.numel % k):
        raise ValueError(
            f"state of parameter '{layout.name}': {k} second-moment values do not divide its "
            f"{layout.numel} elements into equal blocks"
        )
    if codes is not None:
        runs, _ = saved_blocks(state, layout.numel)
        if len(chunk_lengths(run_block_sizes(runs))) != state["m_scales"].numel():
            raise ValueError(
                f"state of parameter '{layout.name}': {state['m_scales'].numel()} 'm_scales' for blocks {list(runs)}; "
                f"expected one per {QBLOCK}-element chunk of each block"
            )


def _storage_to_shape(values: torch.Tensor, shape: Sequence[int], columns: bool) -> torch.Tensor:
    """Per-element values in storage order -> the parameter's shape."""
    return swap_columns(values.view(storage_shape(shape, columns)), columns)


def regroup_v(v: torch.Tensor, saved: Tuple[Tuple[Tuple[int, int], ...], bool], layout: BlockLayout) -> torch.Tensor:
    """Second moments saved for the block layout ``saved`` (``saved_blocks``), moved to
    ``layout``: each element takes its old block's value, then each new block the mean over its
    elements (exact when the partition did not change)."""
    v = v.reshape(-1).float()
    runs, columns = saved
    if (runs, columns) == (layout.runs, layout.columns) or (v.numel() == 0 and layout.num_blocks == 0):
        return v
    if layout.numel == 0:
        return v.new_zeros(layout.num_blocks)
    old_sizes = run_block_sizes(runs).to(v.device)
    per_element = _storage_to_shape(v.repeat_interleave(old_sizes), layout.shape, columns)
    stored = swap_columns(per_element, layout.columns)
    new_sizes = layout.block_sizes().to(v.device)
    block_of_element = torch.repeat_interleave(torch.arange(layout.num_blocks, device=v.device), new_sizes)
    sums = v.new_zeros(layout.num_blocks).index_add_(0, block_of_element, stored.reshape(-1))
    return sums / new_sizes.clamp(min=1)


def absorb_state(group: FlatGroup, states: Dict[int, Dict[str, Any]]) -> None:
    """Copy per-parameter states (index in the group -> state dict) into the group's freshly
    zeroed buffers. Run ``check_state`` on each first."""
    steps = [0] * len(group.params)
    for i, state in states.items():
        layout = group.layouts[i]
        if group.quantized:
            _absorb_codes(group, i, state)
        elif state.get("m_codes") is not None:
            group.shaped(i, group.m_view(i)).copy_(saved_codes_as_float(state, layout))
        elif state.get("m") is not None:
            group.shaped(i, group.m_view(i)).copy_(state["m"].reshape(layout.shape))
        v = second_moment(state)
        if v is not None:
            saved = saved_blocks(state, layout.numel)
            group.v_view(i).copy_(regroup_v(v.detach().to(group.device), saved, layout))
        steps[i] = int(state.get("step", 0))
    group.steps.copy_(torch.tensor(steps, dtype=torch.int64))


def _storage_flat(t: torch.Tensor, columns: bool) -> torch.Tensor:
    """A tensor of the parameter's shape, flat in the storage order (see ``swap_columns``)."""
    return swap_columns(t, columns).reshape(-1)


def saved_codes_as_float(state: Dict[str, Any], layout: BlockLayout) -> torch.Tensor:
    """The float32 first moment (parameter's shape) of a state saved as ``m_codes``/``m_scales``."""
    runs, columns = saved_blocks(state, layout.numel)
    codes = _storage_flat(state["m_codes"], columns)
    flat = dequantize_runs(codes, state["m_scales"].to(codes.device, torch.float32).reshape(-1), runs)
    return _storage_to_shape(flat, layout.shape, columns)


def _absorb_codes(group: FlatGroup, i: int, state: Dict[str, Any]) -> None:
    """Fill the codes and scales of parameter ``i`` of an int8 group from a saved state: copied
    when saved for the same blocks, else (re)quantized from the float first moment (lossy)."""
    layout = group.layouts[i]
    if state.get("m_codes") is not None and saved_blocks(state, layout.numel) == (layout.runs, layout.columns):
        codes, scales = _storage_flat(state["m_codes"], layout.columns), state["m_scales"].reshape(-1)
    elif state.get("m_codes") is not None or state.get("m") is not None:
        m = saved_codes_as_float(state, layout) if state.get("m_codes") is not None else state["m"].reshape(layout.shape)
        codes, scales = quantize_runs(_storage_flat(m.float(), layout.columns), layout.runs)
    else:
        return
    group.m_view(i).copy_(codes)
    group.m_scale_view(i).copy_(scales)


def state_in_format(state: Dict[str, Any], layout: BlockLayout, m_dtype: torch.dtype) -> Dict[str, Any]:
    """A loaded per-parameter state (``check_state`` passed) with its first moment in the format
    of an optimizer whose ``m`` of this parameter is ``m_dtype`` (``torch.int8``: codes and
    scales), keyed as ``state_views`` would hold it after the next build; returned unchanged where
    it already is in that format, or has no first moment or second moments to convert with.
    int8 codes to a float32 ``m`` are exact, to a 16-bit ``m`` rounded; a float ``m`` to codes is
    quantized (lossy) as ``absorb_state`` does, so the next build copies this state bit for bit."""
    has_codes, has_m = state.get("m_codes") is not None, state.get("m") is not None
    v = second_moment(state)
    quantized = m_dtype == torch.int8
    if v is None or not (has_codes or has_m):
        return state
    if (has_codes and quantized) or (has_m and not quantized and state["m"].dtype == m_dtype):
        return state
    step, shape = state.get("step"), layout.shape
    v = regroup_v(v.detach(), saved_blocks(state, layout.numel), layout).to(torch.float32)
    if quantized:
        codes, scales = quantize_runs(_storage_flat(state["m"].reshape(shape).float(), layout.columns), layout.runs)
        return keyed_state(layout, step, v, codes=_storage_to_shape(codes, shape, layout.columns), scales=scales)
    m = saved_codes_as_float(state, layout) if has_codes else state["m"].reshape(shape)
    return keyed_state(layout, step, v, m=m.to(m_dtype))
