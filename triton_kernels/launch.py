"""The Triton backend: launch tables built once per group, and the step that launches the kernels.

The number of launches per group is fixed by the table (one per row size class, three for large
blocks, one for Adam blocks), not by the number of parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..buffers import FlatGroup
from ..partition import ADAM
from . import kernels as K

ROW_MAX = 8192  # blocks up to this many elements: one program each, held in registers
MIN_ROW_BLOCK = 16
TILE = 4096  # elements per tile of a large block
ADAM_TILE = 1024  # elements per program for Adam blocks
CHUNK = 1024  # tile sums added per iteration when reducing a large block


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps(block: int) -> int:
    return min(16, max(1, block // 512))


@dataclass
class _LaunchTables:
    row_classes: List[Tuple[int, torch.Tensor]]  # (BLOCK, rows table) per size class
    tiles: Optional[torch.Tensor]  # large-block tiles
    blocks: Optional[torch.Tensor]  # large blocks
    partial: Optional[torch.Tensor]  # one float32 slot per tile
    adam: Optional[torch.Tensor]  # Adam tiles


def _tiles_of(start: np.ndarray, numel: int, tile: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each block [start, start + numel) into tiles: (tile start, tile numel, block index)."""
    within = np.arange(0, numel, tile, dtype=np.int64)
    t_start = (start[:, None] + within[None, :]).reshape(-1)
    t_numel = np.tile(np.minimum(tile, numel - within), len(start))
    t_block = np.repeat(np.arange(len(start), dtype=np.int64), len(within))
    return t_start, t_numel, t_block


def _table(columns: List[np.ndarray], device: torch.device) -> Optional[torch.Tensor]:
    if not len(columns[0]):
        return None
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.int64)).to(device)


def build_launch_tables(group: FlatGroup) -> _LaunchTables:
    """The kernels' tables for ``group``, from its layouts and offsets."""
    rows = {}  # BLOCK -> lists of columns
    tiles = [[], [], []]
    blocks = [[], [], [], [], []]
    adam = [[], [], [], []]
    num_tiles = num_blocks = 0
    for i, layout in enumerate(group.layouts):
        offset, v_offset, bn, nb = group.offsets[i], group.v_offsets[i], layout.block_numel, layout.num_blocks
        if nb == 0:
            continue
        if layout.rule == ADAM:
            start = np.arange(0, nb, ADAM_TILE, dtype=np.int64)
            for col, values in zip(adam, (offset + start, np.minimum(ADAM_TILE, nb - start), v_offset + start, np.full_like(start, i))):
                col.append(values)
            continue
        starts = offset + np.arange(nb, dtype=np.int64) * bn
        v_index = v_offset + np.arange(nb, dtype=np.int64)
        if bn <= ROW_MAX:
            cols = rows.setdefault(max(MIN_ROW_BLOCK, _next_pow2(bn)), [[], [], [], []])
            for col, values in zip(cols, (starts, np.full(nb, bn), v_index, np.full(nb, i))):
                col.append(values)
            continue
        t_start, t_numel, t_block = _tiles_of(starts, bn, TILE)
        per_block = len(t_start) // nb
        for col, values in zip(tiles, (t_start, t_numel, t_block + num_blocks)):
            col.append(values)
        first = num_tiles + np.arange(nb, dtype=np.int64) * per_block
        for col, values in zip(blocks, (v_index, np.full(nb, i), first, np.full(nb, per_block), np.full(nb, bn))):
            col.append(values)
        num_tiles += len(t_start)
        num_blocks += nb

    def cat(cols):
        return [np.concatenate(c) if c else np.zeros(0, np.int64) for c in cols]

    device = group.device
    tile_table = _table(cat(tiles), device)
    return _LaunchTables(
        row_classes=[(block, _table(cat(cols), device)) for block, cols in sorted(rows.items())],
        tiles=tile_table,
        blocks=_table(cat(blocks), device),
        partial=None if tile_table is None else torch.empty(num_tiles, dtype=torch.float32, device=device),
        adam=_table(cat(adam), device),
    )


def triton_step(group: FlatGroup, coef: torch.Tensor) -> None:
    """Apply one step to ``group`` in place with the Triton kernels."""
    t = group.cache.get("triton")
    if t is None:
        t = group.cache["triton"] = build_launch_tables(group)
    p, g, m, v = group.param_buffer, group.grad_buffer, group.m, group.v
    for block, rows in t.row_classes:
        K.rows_step_kernel[(rows.shape[0],)](p, g, m, v, coef, rows, BLOCK=block, num_warps=_warps(block))
    if t.tiles is not None:
        n_tiles = t.tiles.shape[0]
        K.tile_sumsq_kernel[(n_tiles,)](g, t.tiles, t.partial, TILE=TILE, num_warps=8)
        K.large_block_v_kernel[(t.blocks.shape[0],)](v, coef, t.partial, t.blocks, CHUNK=CHUNK, num_warps=4)
        K.tile_step_kernel[(n_tiles,)](p, g, m, v, coef, t.tiles, t.blocks, TILE=TILE, num_warps=8)
    if t.adam is not None:
        K.adam_step_kernel[(t.adam.shape[0],)](p, g, m, v, coef, t.adam, TILE=ADAM_TILE, num_warps=4)
