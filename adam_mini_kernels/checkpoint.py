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
=========  ==========================================================================

``v``/``vmean`` are float32 here whatever the parameter dtype (official keeps the param dtype).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .buffers import FlatGroup
from .partition import BlockLayout


def state_views(group: FlatGroup, i: int) -> Dict[str, Any]:
    """The official-layout state of parameter ``i`` of ``group``, as views into its buffers."""
    layout = group.layouts[i]
    m, v, step = group.m_view(i), group.v_view(i), group.step_view(i)
    kind, shape, blocks = layout.state_kind, layout.shape, layout.num_blocks
    if kind == "adam":
        return {"m": m.view(shape), "step": step, "v": v.view(shape)}
    if kind == "heads":
        return {"m": m.view(blocks, layout.block_numel), "head_per_gpu": blocks, "step": step, "vmean": v.view(blocks, 1)}
    if kind == "rows":
        return {"m": m.view(shape), "step": step, "neuron_per_gpu": blocks, "vmean": v.view(blocks, 1)}
    return {"m": m.view(shape), "step": step, "reduced": False, "vmean": v.view(()), "block_numel": float(layout.numel)}


def second_moment(state: Dict[str, Any]):
    """The second-moment tensor of a per-parameter state: ``v`` (Adam blocks) or ``vmean``."""
    return state["v"] if "v" in state else state.get("vmean")


def check_state(state: Dict[str, Any], layout: BlockLayout) -> None:
    """Raise ``ValueError`` if ``state`` (official layout or ours) cannot be loaded for a
    parameter laid out as ``layout``."""
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
    v = second_moment(state)
    if v is None:
        return
    k = v.numel()
    if k != layout.num_blocks and (k == 0 or layout.numel % k):
        raise ValueError(
            f"state of parameter '{layout.name}': {k} second-moment values do not divide its "
            f"{layout.numel} elements into equal blocks"
        )


def regroup_v(v: torch.Tensor, numel: int, num_blocks: int) -> torch.Tensor:
    """Second moments saved for another partition of the same parameter, moved to
    ``num_blocks`` blocks: each element takes its old block's value, then each new block the
    mean over its elements (exact when the partition did not change)."""
    v = v.reshape(-1).float()
    if v.numel() == num_blocks:
        return v
    if numel == 0 or num_blocks == 0:
        return v.new_zeros(num_blocks)
    per_element = v.repeat_interleave(numel // v.numel())
    return per_element.view(num_blocks, -1).mean(dim=1)


def absorb_state(group: FlatGroup, states: Dict[int, Dict[str, Any]]) -> None:
    """Copy per-parameter states (index in the group -> state dict) into the group's freshly
    zeroed buffers. Run ``check_state`` on each first."""
    steps = [0] * len(group.params)
    for i, state in states.items():
        layout = group.layouts[i]
        if state.get("m") is not None:
            group.m_view(i).copy_(state["m"].reshape(-1))
        v = second_moment(state)
        if v is not None:
            group.v_view(i).copy_(regroup_v(v.detach().to(group.device), layout.numel, layout.num_blocks))
        steps[i] = int(state.get("step", 0))
    group.steps.copy_(torch.tensor(steps, dtype=torch.int64))
