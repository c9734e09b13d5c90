"""Launch tables of the fused backends (Triton and CUDA), built once per group.

[Note: launch tables]
A group's blocks are stepped by three kinds of work, each described by an int64 table (one row
per program, named columns below) so that the number of launches is fixed by the kinds of work,
not by the number of parameters:

* rows: one program per small block (at most ``ROW_MAX`` elements), which it holds on chip and
  steps in one pass. Rows are grouped into size classes (power-of-two ``block`` sizes) so a
  program's width fits its rows.
* large blocks (more than ``ROW_MAX`` elements): cut into tiles of ``TILE`` elements. Phase 1
  writes the sum of g^2 of each tile (g unscaled by AMP's ``inv_scale``, see [Note: gradient
  multiplier] in coefficients.py) to its own slot of ``partial``; phase 2 adds a block's
  slots in a fixed order into its slot of ``block_sums``; phase 3 updates its v; phase 4 each
  tile's m and p. Deterministic, no atomics, one extra read of g. Two operators: the sums
  (phases 1-2) and the update (3-4).
* blocks split across ranks (sharded parameters, see [Note: sharded parameters] in
  sharding.py), whatever their size, are large blocks too: between the two operators the
  step's one all-reduce (per process group, for all its flat groups) adds their pieces' sums
  over the ranks (``LaunchTables.reduce_split`` places them in it),
  and their v takes the mean over the global block size (the ``LB_NUMEL`` column).
* Adam tiles: ``ADAM_TILE`` consecutive elements of an Adam-block (per-element v) parameter.

Rows and tiles also name the index of their first quantization scale (``ROW_SCALE``,
``TILE_SCALE``): in an int8 group (see [Note: int8 first moment] in quantization.py) a block's
``QBLOCK``-element chunks have their scales one after the other in ``m_scales``, and rows and
tiles start at chunk boundaries (``TILE`` is a multiple of ``QBLOCK``), so a program reads and
writes the scales of its own chunks only. In a float group the column is computed all the same
and not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .buffers import FlatGroup
from .coefficients import NUM_COEFFICIENTS, salt_shard_keys
from .partition import ADAM
from .quantization import QBLOCK
from .sharding import SplitReducer

ROW_MAX = 8192  # blocks up to this many elements are rows (held on chip)
MIN_ROW_BLOCK = 16
TILE = 4096  # elements per tile of a large block
ADAM_TILE = 1024  # elements per Adam tile

# Columns. Rows and Adam tiles: first element, number of elements, index of the (first) v, param,
# index of the first quantization scale (0 for Adam tiles, which are never quantized).
ROW_START, ROW_NUMEL, ROW_V, ROW_PARAM, ROW_SCALE, ROW_COLS = range(6)
# Large-block tiles: first element, number of elements, index of the large block, first scale.
TILE_START, TILE_NUMEL, TILE_BLOCK, TILE_SCALE, TILE_COLS = range(5)
# Large blocks: v index, parameter, first tile, number of tiles, number of elements.
LB_V, LB_PARAM, LB_FIRST_TILE, LB_NUM_TILES, LB_NUMEL, LB_COLS = range(6)


@dataclass
class LaunchTables:
    row_classes: List[Tuple[int, torch.Tensor]]  # (block width, rows table) per size class
    tiles: Optional[torch.Tensor]  # (T, TILE_COLS)
    blocks: Optional[torch.Tensor]  # (L, LB_COLS)
    partial: Optional[torch.Tensor]  # (T,) float32 scratch: one slot per tile
    block_sums: torch.Tensor  # (L,) float32 scratch: one slot per large block (L may be 0)
    adam: Optional[torch.Tensor]  # (A, ROW_COLS)
    reduce_split: Optional[SplitReducer] = None  # the split blocks among the large ones


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Columns:
    """Accumulates the rows of one table, column by column, as numpy arrays."""

    def __init__(self, ncols: int):
        self.cols = [[] for _ in range(ncols)]

    def add(self, *values) -> None:
        n = max(np.size(v) for v in values)
        for col, v in zip(self.cols, values):
            col.append(np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)))

    def tensor(self, device: torch.device) -> Optional[torch.Tensor]:
        if not self.cols[0]:
            return None
        table = np.stack([np.concatenate(c) for c in self.cols], axis=1)
        return torch.from_numpy(np.ascontiguousarray(table)).to(device)


def build_launch_tables(group: FlatGroup) -> LaunchTables:
    """The tables for ``group``, from its layouts (section by section), element offsets, v
    offsets and quantization chunks (counted as ``buffers.chunk_lengths`` does), and for a
    sharded group its split blocks and their global sizes."""
    sharded = group.sharded
    split_v = np.zeros(0, dtype=np.int64) if sharded is None else sharded.split_positions
    divisors = None if sharded is None else sharded.divisors.cpu().numpy()
    rows = {}
    tiles, blocks, adam = _Columns(TILE_COLS), _Columns(LB_COLS), _Columns(ROW_COLS)
    num_tiles = num_blocks = num_scales = 0
    for i, layout in enumerate(group.layouts):
        offset, v_offset = group.offsets[i], group.v_offsets[i]
        if layout.rule == ADAM:
            nb = layout.num_blocks
            if nb == 0:
                continue
            start = np.arange(0, nb, ADAM_TILE, dtype=np.int64)
            adam.add(offset + start, np.minimum(ADAM_TILE, nb - start), v_offset + start, i, 0)
            continue
        for section in layout.sections:  # consecutive spans of equal blocks (see partition.py)
            bn, nb = section.block_numel, section.num_blocks
            chunks = max(1, -(-bn // QBLOCK))  # quantization chunks per block
            starts = offset + np.arange(nb, dtype=np.int64) * bn
            v_index = v_offset + np.arange(nb, dtype=np.int64)
            scale_index = num_scales + np.arange(nb, dtype=np.int64) * chunks
            offset, v_offset, num_scales = offset + bn * nb, v_offset + nb, num_scales + chunks * nb
            if nb == 0:
                continue
            large = np.isin(v_index, split_v) if bn <= ROW_MAX else np.ones(nb, dtype=bool)
            if not large.all():
                whole = ~large
                width = max(MIN_ROW_BLOCK, _next_pow2(bn))
                rows.setdefault(width, _Columns(ROW_COLS)).add(starts[whole], bn, v_index[whole], i, scale_index[whole])
            if not large.any():
                continue
            starts, v_index, scale_index, nb = starts[large], v_index[large], scale_index[large], int(large.sum())
            within = np.arange(0, bn, TILE, dtype=np.int64)
            per_block = len(within)
            tiles.add(
                (starts[:, None] + within[None, :]).reshape(-1),
                np.tile(np.minimum(TILE, bn - within), nb),
                num_blocks + np.repeat(np.arange(nb, dtype=np.int64), per_block),
                (scale_index[:, None] + within[None, :] // QBLOCK).reshape(-1),
            )
            global_numel = bn if divisors is None else divisors[v_index]
            blocks.add(v_index, i, num_tiles + np.arange(nb, dtype=np.int64) * per_block, per_block, global_numel)
            num_tiles += nb * per_block
            num_blocks += nb
    if group.quantized and num_scales != len(group.m_scales):
        raise RuntimeError(f"internal error: the launch tables count {num_scales} quantization chunks, the group has {len(group.m_scales)}")
    device = group.device
    blocks_table = blocks.tensor(device)
    reduce_split = None
    if sharded is not None:
        # Every rank of the mesh joins the all-reduce, also one holding none of the split blocks
        # (its shards of them are empty): it adds zeros.
        large_v = np.concatenate(blocks.cols[LB_V]) if blocks.cols[LB_V] else np.zeros(0, dtype=np.int64)
        reduce_split = sharded.split_reducer(large_v)
    return LaunchTables(
        row_classes=[(width, cols.tensor(device)) for width, cols in sorted(rows.items())],
        tiles=tiles.tensor(device),
        blocks=blocks_table,
        partial=torch.empty(num_tiles, dtype=torch.float32, device=device) if num_tiles else None,
        block_sums=torch.empty(num_blocks, dtype=torch.float32, device=device),
        adam=adam.tensor(device),
        reduce_split=reduce_split,
    )


def fused_sums(group: FlatGroup, ops, inv_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[SplitReducer], None]:
    """The first half of a step of ``group`` through a fused backend's operators ``ops`` (with the
    schemas of csrc/bindings.cpp): the large blocks' sums of g^2 (``large_blocks_sumsq``), with
    the reducer of the split blocks among them (None if the group is not sharded): the step's
    all-reduce adds their pieces over the ranks (``sharding.all_reduce_split_sums``) before
    ``fused_update``. The tables are built once and kept in ``group.cache``."""
    t = group.cache.get("launch_tables")
    if t is None:
        t = group.cache["launch_tables"] = build_launch_tables(group)
    if t.tiles is not None:
        ops.large_blocks_sumsq(group.grad_buffer, inv_scale, t.tiles, t.blocks, t.partial, t.block_sums)
    return t.block_sums, t.reduce_split, None


def fused_update(
    group: FlatGroup,
    ops,
    sums: Tuple[torch.Tensor, Optional[SplitReducer], None],
    active: Optional[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip: Optional[torch.Tensor] = None,
) -> None:
    """The second half, after ``fused_sums`` (and the all-reduce of a sharded group's split
    blocks): the coefficient table (the rounding keys of shards salted:
    ``coefficients.salt_shard_keys``), one call per row class, the large blocks' update, the
    Adam tiles. The coefficient buffer is built once and kept in ``group.cache``. A float group
    passes an empty ``m_scales`` (the operators read it only for int8 ``m``)."""
    t = group.cache["launch_tables"]
    coef = group.cache.get("coef")
    if coef is None:
        coef = group.cache["coef"] = torch.empty(len(group.params), NUM_COEFFICIENTS, dtype=torch.float32, device=group.device)
    rounding = group.round_seed is not None
    p, g, m, v = group.param_buffer, group.grad_buffer, group.m, group.v
    scales = group.m_scales
    if scales is None:
        scales = group.cache.get("no_scales")
        if scales is None:
            scales = group.cache["no_scales"] = torch.empty(0, dtype=torch.float32, device=group.device)
    ops.step_coefficients(group.steps, group.hparams, coef, active, inv_scale, found_inf, clip, group.round_seed or 0, rounding)
    salt_shard_keys(group, coef)
    for width, rows in t.row_classes:
        ops.rows_step(p, g, m, scales, v, coef, rows, width, rounding)
    if t.tiles is not None:
        ops.large_blocks_update(p, g, m, scales, v, coef, t.tiles, t.blocks, t.block_sums, rounding)
    if t.adam is not None:
        ops.adam_step(p, g, m, v, coef, t.adam, rounding)
