"""Sharded parameters (DTensor, FSDP2 ``fully_shard``): local blocks, split blocks, one all-reduce.

[Note: sharded parameters]
The partition is computed on a DTensor parameter's global (logical) shape and full name, exactly
as for a plain tensor. Each rank steps only its local shard. Reading the shard in storage order
keeps the global order of its elements (for a layout stored by columns, reading both in the
transposed order), so the global blocks it touches, of any layout (several sections, column
blocks), are consecutive runs of local elements, one run per block ("local segments"). A
segment holding a whole block is reduced and updated locally. A block split across ranks (a whole-tensor norm weight, a head straddling the
shard boundary, every row under a ``Shard(1)`` placement) needs the sum of g^2 over all its
pieces: every rank computes its pieces' partial sums, the split blocks of every flat group on a
process group go into one vector (each group's slots in a global order every rank derives from
the sharding alone), and ONE ``all_reduce`` per process group per step sums them
(``all_reduce_split_sums``), between every group's reduction and every group's update. The mean
divides by the global block size; padding (FSDP2 pads dim 0) is never part of a segment. A split
block's ``v`` is kept on every rank holding a piece of it, identical everywhere.

The flat buffers hold the local shards. A sharded parameter's storage belongs to its DTensor (and
to FSDP2, which all-gathers from its own padded buffer), so by default it is not re-pointed: each
step copies the local shards into the flat buffer and the results back (one foreach copy each
way), unless FSDP2 shares its storage ([Note: shared FSDP2 storage]). Gradients are re-pointed:
``p.grad`` becomes a DTensor over the flat gradient buffer, which FSDP2 accumulates into and
``zero_grad(set_to_none=False)`` zeroes in one fill.

[Note: shared FSDP2 storage]
Given the model (``AdamMini(..., model=model)``, ``for_model``), the optimizer finds FSDP2's
``FSDPParam`` of each sharded parameter (in the ``fully_shard`` modules' state) and makes the
flat buffer FSDP2's storage of that shard: the DTensor's local tensor becomes the flat-buffer
view and FSDP2's ``reset_sharded_param()`` (what FSDP2 itself calls after ``load_state_dict``)
re-reads it as the storage it all-gathers from. Then no step copies that shard, and the shard is
held once in memory instead of twice. FSDP2 keeps each rank's shard padded to ``ceil(rows /
world)`` rows; a shard is shared only where that padding is empty (every rank but possibly the
last ones of an uneven split), row-major (not ``Conv1D`` column storage), without CPU offload or
a tensor-subclass extension, and where FSDP2 reads back the view (checked): the others keep the
copies. Each step checks, on the host, that a shared shard is still the view (FSDP2 re-points
after ``model.to()``, ``load_state_dict(assign=True)``); one that is not is copied in and shared
again. A compiled step cannot read data pointers: a shared local tensor carries a mark (as the
gradient views do, see [Note: gradient view marks] in buffers.py), and one re-pointed there is
copied in and out (sharing it again is left to an eager step). These are FSDP2 internals (the
same in torch 2.11 to 2.14); where they differ, nothing is shared and the copies stay.

[Note: int8 on shards]
With ``state_dtype=torch.int8`` the local layout's quantization chunks (``QBLOCK`` elements of a
local segment, see [Note: int8 first moment] in quantization.py) must be whole chunks of the
global blocks, so that every rank quantizes exactly what one process would, and a checkpoint
does not depend on the number of ranks. That holds when every piece of a block on a rank starts
at a chunk boundary of the block and ends at one (or at the block's end):
``LocalBlocks.global_chunks`` maps each local chunk to its global one, or says there is none,
and the optimizer refuses a parameter whose shard cuts a chunk on any rank (``cuts_chunks``,
from every rank's pieces: all ranks raise alike, none is left waiting in the split-block
all-reduce) with a clear error before anything changes (FSDP2's
``Shard(0)`` of weights whose rows are multiples of 256 elements never cuts a chunk). Whether a
parameter's m is int8 is decided on the global layout, alike on every rank. Saved, ``m_codes``
is sharded like the parameter and ``m_scales`` replicated in the global chunk order, gathered
with ``vmean`` in the same all-reduce.

Supported: DTensors on a mesh of any number of dims, each dim ``Shard(d)`` or ``Replicate``, and
FSDP2's ``_StridedShard`` over tensor parallelism: FSDP2 ``Shard(0)``; HSDP ``(Replicate(),
Shard(0))``; FSDP2 + TP ``(_StridedShard(0), Shard(0))`` for column-wise and ``(Shard(0),
Shard(1))`` for row-wise weights on a (dp, tp) mesh. On each sharded dim of the parameter a shard
is one contiguous range of indices (``ShardInfo.ranges``): placements on one dim nest as
torch.chunk splits, left to right in mesh order, or right to left after a leading ``_StridedShard``
(the later mesh dims split first, as FSDP2 shards a TP shard), checked against the local shape. A
block's pieces are then runs along the last cut dim of the storage order. The split blocks' sums
are all-reduced over the ranks of the parameter's shard dims only (``ShardInfo.process_group``: one
mesh dim's group, the world's, or a group made once for the ranks of several dims): the replicas
along the other dims hold the same gradients and step alike; parameters of other shard dims are
other flat groups. A rank whose shards of a group are all empty (more ranks than rows) still joins
the group's all-reduce. Anything else (``Partial``, a ``_StridedShard`` not placed as FSDP2 places
it) is a ``NotImplementedError`` rather than a wrong ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .buffers import new_mark
from .checkpoint import regroup_v, saved_blocks, saved_codes_as_float, second_moment, state_views
from .partition import ADAM, BlockLayout, Section, storage_shape, swap_columns
from .quantization import QBLOCK

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None


# The attribute marking a local tensor shared with FSDP2 (see [Note: shared FSDP2 storage]).
SHARE_MARK = "_adam_mini_shared_shard"


def is_sharded(p: Any) -> bool:
    """True for a DTensor parameter (FSDP2, ``distribute_tensor``)."""
    return DTensor is not None and isinstance(p, DTensor)


def _chunk_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """(first index, length) of ``rank``'s piece of ``n`` indices split as torch.chunk splits
    (DTensor and FSDP2 do): equal chunks of ceil(n / world), the last ones shorter or empty."""
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(chunk, n - start)


@dataclass(frozen=True)
class ShardInfo:
    """Where one rank's local shard sits in a DTensor parameter: on each sharded dim of the
    parameter, one contiguous range of global indices (see [Note: sharded parameters])."""

    mesh: Any  # the DeviceMesh
    placements: tuple
    shard_mesh_dims: Tuple[int, ...]  # the mesh dims with a Shard (or _StridedShard) placement
    mesh_sizes: Tuple[int, ...]  # their sizes
    rank: int  # this rank's index among the ranks of those mesh dims (row-major coordinates)
    global_shape: Tuple[int, ...]
    local_shape: Tuple[int, ...]
    process_group: Any = None  # the ranks of those mesh dims holding this rank's copy

    @property
    def world(self) -> int:
        """Ranks over which the parameter is sharded (1 when replicated)."""
        return math.prod(self.mesh_sizes)

    @property
    def sharded(self) -> bool:
        return bool(self.shard_mesh_dims)

    def ranges(self, rank: int) -> Dict[int, Tuple[int, int]]:
        """(first index, length) along each sharded dim of the parameter, for the shard of
        ``rank`` (an index as ``self.rank``). Placements sharding one dim nest left to right, as
        DTensor's ``Shard``; a leading ``_StridedShard`` (FSDP2 over tensor parallelism) makes
        them nest right to left: the later mesh dims split the dim first."""
        coords = np.unravel_index(rank, self.mesh_sizes) if self.mesh_sizes else ()
        by_dim: Dict[int, List[Tuple[Any, int, int]]] = {}
        for k, coord, size in zip(self.shard_mesh_dims, coords, self.mesh_sizes):
            placement = self.placements[k]
            by_dim.setdefault(placement.dim, []).append((placement, size, int(coord)))
        out = {}
        for dim, nest in by_dim.items():
            if _is_strided(nest[0][0]):
                nest = nest[::-1]
            start, n = 0, self.global_shape[dim]
            for _, size, coord in nest:
                offset, n = _chunk_range(n, size, coord)
                start += offset
            out[dim] = (start, n)
        return out


def _is_strided(placement: Any) -> bool:
    return type(placement).__name__ == "_StridedShard"


def _check_placements(name: str, placements: tuple, mesh_sizes: Dict[int, int]) -> None:
    """Refuse placements this optimizer does not support (see [Note: sharded parameters])."""
    for placement in placements:
        if type(placement) not in (Shard, Replicate) and not _is_strided(placement):
            raise NotImplementedError(
                f"parameter '{name}' has placement {type(placement).__name__} ({placement}); AdamMini supports "
                "Shard(d), Replicate and FSDP2's _StridedShard parameters"
            )
    for k, placement in enumerate(placements):
        if not _is_strided(placement):
            continue
        later = [j for j in range(k + 1, len(placements)) if type(placements[j]) is Shard and placements[j].dim == placement.dim]
        earlier = [j for j in range(k) if type(placements[j]) is not Replicate and placements[j].dim == placement.dim]
        if earlier or getattr(placement, "split_factor", None) != math.prod(mesh_sizes[j] for j in later):
            raise NotImplementedError(
                f"parameter '{name}' has placements {placements}; AdamMini supports a _StridedShard only as FSDP2 "
                "places it over tensor parallelism (first on its dim, split_factor the product of the later "
                "Shard placements' mesh sizes on that dim)"
            )


_GROUPS: Dict[Tuple[int, ...], Any] = {}  # process groups over several mesh dims, by their ranks


def _live(group: Any) -> bool:
    """Whether ``group`` still belongs to the current process group set (not destroyed)."""
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _group_over(mesh: Any, mesh_dims: Tuple[int, ...]) -> Any:
    """The process group of this rank's ranks along ``mesh_dims`` (the others fixed at this
    rank's coordinates): the mesh's own group for one dim, else the world's where it is all of
    it, else a new group made once per process group set (only its members take part)."""
    if len(mesh_dims) <= 1:
        return mesh.get_group(mesh_dims[0] if mesh_dims else 0)
    coords = mesh.get_coordinate()
    index = tuple(slice(None) if k in mesh_dims else coords[k] for k in range(mesh.ndim))
    ranks = tuple(sorted(int(r) for r in mesh.mesh[index].reshape(-1).tolist()))
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    if ranks not in _GROUPS or not _live(_GROUPS[ranks]):
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[ranks]


def shard_info(name: str, p: Any) -> ShardInfo:
    """The ``ShardInfo`` of DTensor parameter ``p``; raises ``NotImplementedError`` for
    placements this optimizer does not support (see [Note: sharded parameters])."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    _check_placements(name, placements, {k: mesh.size(k) for k in range(mesh.ndim)})
    shard_dims = tuple(k for k, placement in enumerate(placements) if type(placement) is not Replicate)
    sizes = tuple(mesh.size(k) for k in shard_dims)
    coords = mesh.get_coordinate()
    rank = int(np.ravel_multi_index([coords[k] for k in shard_dims], sizes)) if shard_dims else 0
    info = ShardInfo(mesh, placements, shard_dims, sizes, rank, tuple(p.shape), tuple(p._local_tensor.shape),
                     _group_over(mesh, shard_dims))
    expected = list(info.global_shape)
    for dim, (_, length) in info.ranges(rank).items():
        expected[dim] = length
    if tuple(expected) != info.local_shape:
        raise NotImplementedError(
            f"parameter '{name}': local shard of shape {list(info.local_shape)} is not the split {expected} of "
            f"{list(info.global_shape)} that placements {placements} give; uneven DTensor shards are not supported"
        )
    return info


def check_grad_placement(name: str, p: Any) -> None:
    """Raise when the gradient of a DTensor parameter is not placed like the parameter."""
    g = p.grad
    if g is not None and (not isinstance(g, DTensor) or tuple(g.placements) != tuple(p.placements)):
        where = tuple(g.placements) if isinstance(g, DTensor) else type(g).__name__
        raise NotImplementedError(
            f"gradient of sharded parameter '{name}' is placed as {where}, the parameter as {tuple(p.placements)}; "
            "AdamMini needs gradients sharded like their parameters (reduce Partial gradients first)"
        )


def _chunks_per_block(layout: BlockLayout) -> np.ndarray:
    """Quantization chunks of each block (an empty block has one, as ``buffers.chunk_lengths``
    counts them)."""
    return np.maximum(1, -(-layout.block_sizes().numpy() // QBLOCK))


def _pieces(layout: BlockLayout, info: ShardInfo, rank: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global block id, first, end) of each contiguous piece of a global block that ``rank``'s
    shard holds, in global storage positions (the transposed order for column layouts), in the
    local storage order. Zero-length pieces are left out."""
    shape = layout.storage_shape
    empty = np.zeros(0, dtype=np.int64)
    # (first, length) per storage dim (the parameter's last two dims swapped for columns).
    spans = [(0, n) for n in shape]
    swapped = {len(shape) - 2: len(shape) - 1, len(shape) - 1: len(shape) - 2} if layout.columns else {}
    for dim, span in info.ranges(rank).items():
        spans[swapped.get(dim, dim)] = span
    if layout.numel == 0 or any(length == 0 for _, length in spans):
        return empty, empty, empty
    cut = [j for j, (first, length) in enumerate(spans) if (first, length) != (0, shape[j])]
    if not cut:
        starts, run = np.zeros(1, dtype=np.int64), layout.numel
    else:
        # Runs along the last cut dim (with every dim inside it whole), one per index of the
        # dims outside it, in row-major order: the local storage order.
        k = cut[-1]
        inner = math.prod(shape[k + 1 :])
        starts = np.zeros(1, dtype=np.int64)
        for j in range(k):
            first, length = spans[j]
            stride = math.prod(shape[j + 1 :])
            starts = (starts[:, None] + np.arange(first, first + length, dtype=np.int64)[None, :] * stride).reshape(-1)
        starts = starts + spans[k][0] * inner
        run = spans[k][1] * inner
    bounds = np.r_[0, np.cumsum(layout.block_sizes().numpy())]
    first = np.searchsorted(bounds, starts, side="right") - 1
    last = np.searchsorted(bounds, starts + run - 1, side="right") - 1
    per_run = last - first + 1
    run_of = np.repeat(np.arange(len(starts)), per_run)
    ids = first[run_of] + np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    lo = np.maximum(starts[run_of], bounds[ids])
    hi = np.minimum(starts[run_of] + run, bounds[ids + 1])
    keep = hi > lo
    return ids[keep], lo[keep], hi[keep]


def segments(layout: BlockLayout, info: ShardInfo, rank: int) -> Tuple[np.ndarray, np.ndarray]:
    """(global block id, number of local elements) of each local segment of ``rank``'s shard, in
    storage order (see [Note: sharded parameters])."""
    ids, lo, hi = _pieces(layout, info, rank)
    if len(ids) == 0:
        return ids, ids.copy()
    # Pieces end where the next begins in local order: merge pieces of one block.
    new = np.r_[True, ids[1:] != ids[:-1]]
    return ids[new], np.add.reduceat(hi - lo, np.flatnonzero(new))


@dataclass
class LocalBlocks:
    """One sharded parameter's local part of the partition."""

    info: ShardInfo
    global_layout: BlockLayout
    layout: BlockLayout  # of the local shard: what the flat buffers hold
    block_ids: np.ndarray  # global block of each local segment
    sizes: np.ndarray  # local elements of each segment
    full_sizes: np.ndarray  # elements of each segment's global block (the mean's divisor)

    @property
    def split(self) -> np.ndarray:
        """bool per segment: its block has pieces on other ranks."""
        return self.sizes < self.full_sizes

    def global_chunks(self, rank: Optional[int] = None) -> Optional[np.ndarray]:
        """The global quantization chunk (see [Note: int8 on shards]) of each chunk of the local
        layout of ``rank``'s shard (default: this rank's), in order; None when that shard cuts a
        global chunk."""
        ids, lo, hi = _pieces(self.global_layout, self.info, self.info.rank if rank is None else rank)
        bounds = np.r_[0, np.cumsum(self.global_layout.block_sizes().numpy())]
        per_block = _chunks_per_block(self.global_layout)
        base = np.cumsum(per_block) - per_block  # each block's first global chunk
        first, end = lo - bounds[ids], hi - bounds[ids]
        if not ((first % QBLOCK == 0) & ((end % QBLOCK == 0) | (hi == bounds[ids + 1]))).all():
            return None
        counts = -(-(end - first) // QBLOCK)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(base[ids] + first // QBLOCK, counts) + within

    def cuts_chunks(self) -> bool:
        """Whether any rank's shard cuts a global quantization chunk: decided from every rank's
        pieces (on the host, no collective), alike on every rank."""
        return any(self.global_chunks(rank) is None for rank in range(self.info.world))


def _sections(rules: np.ndarray, sizes: np.ndarray, empty_rule: str) -> Tuple[Section, ...]:
    """Consecutive local segments of one rule and equal size, as the sections of a block layout."""
    if len(sizes) == 0:
        return (Section(empty_rule, 0, 0),)
    starts = np.flatnonzero(np.r_[True, (sizes[1:] != sizes[:-1]) | (rules[1:] != rules[:-1])])
    counts = np.diff(np.r_[starts, len(sizes)])
    return tuple(Section(str(rules[a]), int(sizes[a]), int(c)) for a, c in zip(starts, counts))


def local_blocks(layout: BlockLayout, info: ShardInfo) -> LocalBlocks:
    """The local segments of this rank's shard of a parameter laid out as ``layout`` (any
    layout: several sections, column storage): the local layout has one block per segment
    (sections of equal-size segments of one rule), stored as the global one (by columns or not)."""
    ids, sizes = segments(layout, info, info.rank)
    full_sizes = layout.block_sizes().numpy()[ids]
    rules = np.repeat(np.array([s.rule for s in layout.sections]), [s.num_blocks for s in layout.sections])[ids]
    local = BlockLayout(layout.name, layout.rule, info.local_shape, _sections(rules, sizes, layout.rule), layout.columns)
    return LocalBlocks(info, layout, local, ids, sizes, full_sizes)


def split_slots(blocks: Sequence[LocalBlocks]) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """The all-reduce vector of a flat group's sharded parameters (``blocks``, in group order,
    the same list on every rank): one slot per block split across ranks, numbered in a global
    order every rank derives from the sharding alone. Returns, per parameter, this rank's split
    local segments and their slots, and the number of slots."""
    segs, slots, base = [], [], 0
    for lb in blocks:
        full = lb.global_layout.block_sizes().numpy()
        held = [segments(lb.global_layout, lb.info, r) for r in range(lb.info.world)]
        split_ids = np.unique(np.concatenate([ids[sizes < full[ids]] for ids, sizes in held]))
        mine = np.flatnonzero(lb.split)
        segs.append(mine)
        slots.append(base + np.searchsorted(split_ids, lb.block_ids[mine]))
        base += len(split_ids)
    return segs, slots, base


class SplitReducer:
    """Where a flat group's split blocks sit in a vector of its per-block sums of g^2 and in the
    group's slots of the step's all-reduce (see [Note: sharded parameters] and
    ``all_reduce_split_sums``)."""

    def __init__(self, owner: "ShardedGroup", positions: np.ndarray, slots: np.ndarray, num_slots: int, device: torch.device):
        self.process_group = owner.process_group
        self.positions = torch.from_numpy(positions).to(device)
        self.slots = torch.from_numpy(slots).to(device)
        self.num_slots = num_slots  # the same on every rank: derived from the sharding alone

    def gather(self, block_sum: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums of the split blocks, in slot order (zeros where it holds no
        piece of a block)."""
        buffer = block_sum.new_zeros(self.num_slots)
        return buffer.index_copy_(0, self.slots, block_sum.index_select(0, self.positions))

    def scatter(self, block_sum: torch.Tensor, summed: torch.Tensor) -> None:
        """Replace the split entries of ``block_sum`` by their sums over all ranks, in place."""
        block_sum.index_copy_(0, self.positions, summed.index_select(0, self.slots))


def all_reduce_split_sums(
    pending: Sequence[Tuple[torch.Tensor, SplitReducer]], extra: Dict[Any, torch.Tensor]
) -> Dict[Any, torch.Tensor]:
    """The step's collectives: ONE ``all_reduce`` per process group, whatever the number of flat
    groups on it, of the split blocks' partial sums of every group (``pending``: each group's
    per-block sums and its reducer; written back in place) with ``extra[process_group]`` (1-D
    float32 values to sum over the same ranks: the clipping norm's squares of shards) appended.
    Returns the summed extras by process group. Every rank makes the same calls in the same
    order: the flat groups, their slots and the extras' process groups follow from the
    sharding alone."""
    by_group: Dict[Any, List[Tuple[torch.Tensor, SplitReducer]]] = {}
    for block_sum, reducer in pending:
        if reducer.num_slots:
            by_group.setdefault(reducer.process_group, []).append((block_sum, reducer))
    for process_group in extra:
        by_group.setdefault(process_group, [])
    summed_extra = {}
    for process_group, items in by_group.items():
        parts = [reducer.gather(block_sum) for block_sum, reducer in items]
        if process_group in extra:
            parts.append(extra[process_group])
        device = parts[0].device
        buffer = torch.cat([part.to(device) for part in parts]) if len(parts) > 1 else parts[0]
        dist.all_reduce(buffer, group=process_group)
        offset = 0
        for block_sum, reducer in items:
            reducer.scatter(block_sum, buffer[offset : offset + reducer.num_slots].to(block_sum.device))
            offset += reducer.num_slots
        if process_group in extra:
            summed_extra[process_group] = buffer[offset:]
    return summed_extra


def as_dtensor(local: torch.Tensor, info: ShardInfo, columns: bool = False) -> Any:
    """A DTensor over ``local`` (no copy), placed as the parameter ``info`` describes; its global
    strides are row-major, or those of the storage with the last two dims swapped for a
    ``columns`` view."""
    shape = torch.Size(info.global_shape)
    stride = swap_columns(torch.empty(storage_shape(shape, columns), device="meta"), columns).stride()
    return DTensor.from_local(local, info.mesh, info.placements, run_check=False, shape=shape, stride=stride)


def fsdp_params(model: Any) -> Dict[int, Any]:
    """``id(sharded parameter)`` -> FSDP2's ``FSDPParam`` holding it, over the ``fully_shard``
    modules of ``model`` (see [Note: shared FSDP2 storage]); empty for None, a model without
    them, or FSDP2 internals other than torch 2.11-2.14's."""
    found: Dict[int, Any] = {}
    if model is None:
        return found
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12; 2.11 has one group
        if groups is None:
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                param = getattr(fsdp_param, "sharded_param", None)
                if param is not None:
                    found[id(param)] = fsdp_param
    return found


def _fsdp_storage(fsdp_param: Any) -> Optional[torch.Tensor]:
    """The 1-D tensor FSDP2 all-gathers parameter ``fsdp_param`` from, or None."""
    data = getattr(fsdp_param, "_sharded_param_data", None)
    return data if type(data) is torch.Tensor else None


def share_storage(fsdp_param: Any, p: Any, view: torch.Tensor) -> bool:
    """Make ``view`` (a flat-buffer view holding the shard's current values) FSDP2's storage of
    DTensor parameter ``p`` and its local tensor; True when done, False (nothing changed) where it
    cannot be (see [Note: shared FSDP2 storage])."""
    storage = _fsdp_storage(fsdp_param)
    module_info = getattr(fsdp_param, "_module_info", None)
    fits = (
        storage is not None
        and getattr(fsdp_param, "sharded_param", None) is p
        # FSDP2 re-reads the parameter registered on the module: it must be the sharded one
        # (not so while unsharded, e.g. with set_reshard_after_backward(False)).
        and getattr(getattr(fsdp_param, "sharded_state", None), "name", None) == "SHARDED"
        and module_info is not None
        and getattr(module_info.module, module_info.param_name, None) is p
        and getattr(fsdp_param, "offload_to_cpu", True) is False
        and tuple(getattr(fsdp_param, "padded_sharded_param_size", ())) == tuple(view.shape)
        and view.numel() > 0
        and view.is_contiguous()
        and p._local_tensor.dtype == view.dtype
        and hasattr(fsdp_param, "reset_sharded_param")
    )
    if not fits:
        return False
    old = p._local_tensor
    p._local_tensor = view
    fsdp_param.reset_sharded_param()
    if is_shared(fsdp_param, p, (view.data_ptr(), view.numel())):
        return True
    p._local_tensor = old  # FSDP2 did not take it: back to its own storage
    fsdp_param.reset_sharded_param()
    return False


def is_shared(fsdp_param: Any, p: Any, span: Tuple[int, int]) -> bool:
    """Whether FSDP2 all-gathers parameter ``p`` from the memory ``span`` (data pointer, number
    of elements) and ``p``'s local tensor starts there."""
    storage = _fsdp_storage(fsdp_param)
    return storage is not None and (storage.data_ptr(), storage.numel()) == span and p._local_tensor.data_ptr() == span[0]


class ShardedGroup:
    """The sharded parameters of one flat group (``FlatGroup.sharded``): their DTensors, local
    blocks and the split-block all-reduce. The group's ``params`` are plain proxies of the local
    shards (see [Note: sharded parameters])."""

    def __init__(self, group, members: Sequence[Tuple[int, Any, LocalBlocks]], fsdp: Optional[Dict[int, Any]] = None):
        self.members = list(members)  # (index in the group, DTensor parameter, LocalBlocks)
        # Members whose FSDP2 FSDPParam is known (index -> it), and those sharing its storage.
        fsdp = fsdp or {}
        self.fsdp = {i: fsdp[id(p)] for i, p, lb in self.members if id(p) in fsdp and not lb.layout.columns}
        # Index -> the (data pointer, numel) of the flat-buffer span FSDP2 holds as its storage.
        # Not the view itself: a compiled step must see a shared local tensor only through its
        # DTensor (its mark is guarded there; dynamo gives an object reachable twice the source
        # it was first met by).
        self.shared: Dict[int, Tuple[int, int]] = {}
        self._share_marks = {i: new_mark() for i in self.fsdp}  # see [Note: shared FSDP2 storage]
        self.device = group.device
        (self.process_group,) = {lb.info.process_group for _, _, lb in self.members}
        by_index = {i: lb for i, _, lb in self.members}
        sizes, divisors = [], []
        for i, layout in enumerate(group.layouts):
            lb = by_index.get(i)
            if lb is None:
                sizes.append(layout.block_sizes().numpy())
                divisors.append(sizes[-1])
            else:
                sizes.append(lb.sizes.astype(np.int64))
                divisors.append(lb.full_sizes.astype(np.int64))
        # One entry per v value of the group: local elements, and the global block size (mean).
        self.segment_sizes = torch.from_numpy(np.concatenate(sizes)).to(group.device)
        self.divisors = torch.from_numpy(np.concatenate(divisors)).to(group.device)
        segs, slots, num_slots = split_slots([lb for _, _, lb in self.members])
        positions = [group.v_offsets[i] + seg for (i, _, _), seg in zip(self.members, segs)]  # in the group's v
        # The split blocks: their v indices (sorted) and all-reduce slots.
        positions, slots = np.concatenate(positions).astype(np.int64), np.concatenate(slots).astype(np.int64)
        order = np.argsort(positions)
        self.split_positions, self.split_slots, self.num_slots = positions[order], slots[order], num_slots
        # The torch backend's per-block sums are indexed by v.
        self.reduce_split = self.split_reducer(np.arange(group.v.numel(), dtype=np.int64))

    def split_reducer(self, v_index: np.ndarray) -> SplitReducer:
        """Where the split blocks' sums of g^2 go in the step's all-reduce, for a vector of
        per-block sums whose entry k belongs to the block of v index ``v_index[k]`` (the group's v for the
        torch backend, the large-block table for the fused ones)."""
        at = np.searchsorted(self.split_positions, v_index)
        found = at < len(self.split_positions)
        found[found] = self.split_positions[at[found]] == v_index[found]
        positions = np.flatnonzero(found).astype(np.int64)
        return SplitReducer(self, positions, self.split_slots[at[found]], self.num_slots, self.device)

    def pull(self, group, traced: bool = False) -> None:
        """Before a step: point the proxies' ``.grad`` at the DTensors' local gradients and copy
        the local shards of the parameters into the flat buffer (those FSDP2 still holds there
        need none; one it re-pointed is copied and no longer counted as shared). ``traced``: in
        a compiled step, which tells a shared shard by its mark (no data pointers)."""
        for i, p, _ in self.members:
            check_grad_placement(group.layouts[i].name, p)
            group.params[i].grad = None if p.grad is None else p.grad._local_tensor
            if i in self.shared and not (self._holds_shard(i, p) if traced else is_shared(self.fsdp[i], p, self.shared[i])):
                del self.shared[i]
        copied = [(i, p) for i, p, _ in self.members if i not in self.shared]
        if copied:
            torch._foreach_copy_([group.param_view(i) for i, _ in copied], [p._local_tensor for _, p in copied])

    def adopt(self, group) -> None:
        """After ``FlatGroup.repair`` (the flat buffer holds every shard's values): re-point
        gradients that were copied in as DTensors over the flat gradient buffer (the group's
        gradient view becomes the DTensor's local tensor, marked: a traced step recognizes it),
        and make the flat buffer FSDP2's storage of the shards it can hold (see [Note: shared
        FSDP2 storage]). Eager steps only: see [Note: compiled steps]."""
        for i, p, lb in self.members:
            if self._grad_off_buffer(group, i, p):
                p.grad = as_dtensor(group.grad_views[i], lb.info, lb.layout.columns)
                group.grad_views[i] = group.params[i].grad = group.marked_grad(i, p.grad._local_tensor)
            if i in self.fsdp and i not in self.shared:
                view = group.param_view(i)
                if share_storage(self.fsdp[i], p, view):
                    self.shared[i] = (view.data_ptr(), view.numel())
                    setattr(p._local_tensor, SHARE_MARK, self._share_marks[i])

    @staticmethod
    def _grad_off_buffer(group, i: int, p: Any) -> bool:
        """Whether DTensor ``p`` (member ``i``) has a gradient outside the flat gradient buffer."""
        return p.grad is not None and p.grad._local_tensor.data_ptr() != group.grad_views[i].data_ptr()

    def _holds_shard(self, i: int, p: Any) -> bool:
        """Whether the local tensor of member ``i``'s DTensor ``p`` is the one shared with FSDP2
        when it was marked (compiled steps: see [Note: shared FSDP2 storage])."""
        return getattr(p._local_tensor, SHARE_MARK, None) == self._share_marks[i]

    def zero_grad(self, group) -> None:
        """Zero the DTensors' local gradients that do not alias the flat gradient buffer (which
        ``FlatGroup.zero_grad`` fills): those a compiled step left where they were."""
        detached = [p.grad._local_tensor for i, p, _ in self.members if self._grad_off_buffer(group, i, p)]
        if detached:
            torch._foreach_zero_(detached)

    def push(self, group) -> None:
        """After a step: copy the updated local shards back into the DTensors (not those whose
        storage the flat buffer is)."""
        copied = [(i, p) for i, p, _ in self.members if i not in self.shared]
        if copied:
            torch._foreach_copy_([p._local_tensor for _, p in copied], [group.param_view(i) for i, _ in copied])

    def partial_members(self) -> List[int]:
        """Indices of the members whose gradients are split across ranks (not replicated): their
        squared norms are summed over the mesh for the global gradient norm."""
        return [i for i, _, lb in self.members if lb.info.sharded]


def local_state_views(group, i: int) -> Dict[str, Any]:
    """The state of sharded member ``i`` of ``group`` as views of the local shard: ``m`` (local
    shape; ``m_codes`` and ``m_scales`` in an int8 group), ``v`` (Adam blocks, local shape) or
    ``vmean`` (one value per local segment)."""
    layout = group.layouts[i]
    if group.quantized:
        return state_views(group, i)  # its keys describe any layout
    m, v, step = group.shaped(i, group.m_view(i)), group.v_view(i), group.step_view(i)
    if layout.rule == ADAM:
        return {"m": m, "step": step, "v": v.view(layout.shape)}
    return {"m": m, "step": step, "vmean": v, "block_runs": layout.runs, "columns": layout.columns}


def num_chunks(layout: BlockLayout) -> int:
    """Quantization chunks of a layout."""
    return int(_chunks_per_block(layout).sum())


def global_state(entries: Sequence[Tuple[Dict[str, Any], LocalBlocks]]) -> List[Dict[str, Any]]:
    """The saved form of sharded parameters' local states (``(state, LocalBlocks)``, the same
    parameters in the same order on every rank): ``m`` (or int8 ``m_codes``; and Adam ``v``) as
    DTensors sharded like the parameter (a column-stored one copied to the row-major order),
    ``vmean`` (and int8 ``m_scales``) as replicated DTensors of every global block (chunk), in
    official's shape with official's metadata keys (the ``blocks`` kind's for layouts official
    cannot represent, and for int8 states, as ``checkpoint.state_views`` writes them). One
    all-reduce per process group, a collective: every rank must call it."""
    out: List[Dict[str, Any]] = []
    # Per process group: (entry, key, number of global values) of what is gathered.
    gathered: Dict[Any, List[Tuple[int, str, int]]] = {}
    for k, (state, lb) in enumerate(entries):
        m_key = "m_codes" if "m_codes" in state else "m"
        saved = {m_key: as_dtensor(state[m_key].contiguous(), lb.info), "step": state["step"]}
        parts = gathered.setdefault(lb.info.process_group, [])
        if "v" in state:
            saved["v"] = as_dtensor(state["v"], lb.info)
        else:
            parts.append((k, "vmean", lb.global_layout.num_blocks))
        if m_key == "m_codes":
            parts.append((k, "m_scales", num_chunks(lb.global_layout)))
        out.append(saved)
    for process_group, parts in gathered.items():
        if not parts:
            continue
        first, key, _ = parts[0]
        full = torch.zeros(sum(n for *_, n in parts), dtype=torch.float32, device=entries[first][0][key].device)
        base = 0
        for k, key, n in parts:
            state, lb = entries[k]
            where = lb.block_ids if key == "vmean" else lb.global_chunks()
            full[base + torch.from_numpy(where).to(full.device)] = state[key].float().reshape(-1)
            base += n
        # v and the scales are >= 0, and a rank holds 0 where it has no piece: the max is every
        # value (a chunk is held by one rank, or by all with the same value when replicated).
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=process_group)
        for (k, key, _), values in zip(parts, full.split([n for *_, n in parts])):
            layout, mesh = entries[k][1].global_layout, entries[k][1].info.mesh
            kind = "blocks" if "m_codes" in out[k] else layout.state_kind
            if key == "vmean":
                values = values.reshape(() if kind == "whole" else (-1,) if kind == "blocks" else (-1, 1))
            out[k][key] = DTensor.from_local(values.clone(), mesh, (Replicate(),) * mesh.ndim, run_check=False)
            if key != "vmean":
                continue
            if kind == "blocks":
                out[k].update(block_runs=layout.runs, columns=layout.columns)
            elif kind == "heads":
                out[k]["head_per_gpu"] = layout.num_blocks
            elif kind == "rows":
                out[k]["neuron_per_gpu"] = layout.num_blocks
            elif kind == "whole":
                out[k].update(reduced=False, block_numel=float(layout.numel))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_state(state: Dict[str, Any], lb: LocalBlocks) -> Dict[str, Any]:
    """A saved state of a sharded parameter (DTensors as ``global_state`` writes them, or plain
    tensors of the global shape, e.g. from a single-process run or official 1.1.1) cut to this
    rank's local shard."""
    info = lb.info

    def shard(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):
            if tuple(t.placements) == info.placements and t.device_mesh == info.mesh:
                return t._local_tensor
            t = t.full_tensor()
        t = t.reshape(info.global_shape)
        for dim, (start, length) in info.ranges(info.rank).items():
            t = t.narrow(dim, start, length)
        return t

    layout = lb.global_layout
    local = {k: v for k, v in state.items() if k not in ("m", "m_codes", "m_scales", "v", "vmean", "block_runs", "columns")}
    if state.get("m_codes") is not None:
        chunks = lb.global_chunks()
        if chunks is not None and saved_blocks(state, layout.numel) == (layout.runs, layout.columns):
            local["m_codes"] = shard(state["m_codes"])
            local["m_scales"] = _full(state["m_scales"]).reshape(-1)[torch.from_numpy(chunks).to(state["m_scales"].device)]
        else:  # saved for other blocks, or this shard cuts chunks: the (exact) float m, cut
            full = {**state, "m_codes": _full(state["m_codes"]), "m_scales": _full(state["m_scales"])}
            local["m"] = shard(saved_codes_as_float(full, layout))
    elif state.get("m") is not None:
        local["m"] = shard(state["m"])
    if "v" in state and layout.rule == ADAM:
        local["v"] = shard(state["v"])
    else:
        v = _full(second_moment(state))
        if v is not None:
            v = regroup_v(v, saved_blocks({**state, "vmean": v}, layout.numel), layout)
            local["vmean"] = v[torch.from_numpy(lb.block_ids).to(v.device)]
            local.update(block_runs=lb.layout.runs, columns=lb.layout.columns)
    return local
