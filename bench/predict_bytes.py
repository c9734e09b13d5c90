#!/usr/bin/env python
"""Predicted device-memory traffic of a fused step, per parameter set, before any GPU run.

    python bench/predict_bytes.py [--gbps 2984]

For each set of ``param_sets.py`` it takes the partition (``AdamMini.partition_summary()`` on
meta tensors) and the launch-table constants of ``adam_mini_kernels/launch_tables.py``, and
counts the bytes that Triton kernel v1 (``triton_kernels/kernels.py``) reads and writes:

* rows (blocks of at most ROW_MAX elements), per row of n elements: g, p, m read and p, m
  written (5 n s), its v read and written (8 B), its launch-table row read (ROW_COLS int64).
* large blocks, per tile of t <= TILE elements: phase 1 reads g (t s) and its tile row and writes
  a float32 partial sum; phase 2, per block, reads its block row and its partials and writes the
  block's sum; phase 3 reads the block row, the sum and v, writes v; phase 4 reads the tile row,
  g, p, m and writes p, m (5 t s). So g is read twice: 6 s per element.
* Adam tiles (per-element v), per tile of t <= ADAM_TILE: 5 t s for g, p, m, plus 8 t for v,
  plus the tile row.

The per-parameter coefficient rows (NUM_COEFFICIENTS float32 each) are not counted and a block
row shared by a block's tiles is counted once per phase (they stay in L2). Time = bytes / copy bandwidth: a floor for this design, assuming each kernel
streams at the copy rate and nothing else (launch gaps, the optimizer's host code) costs time.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import param_sets as PS  # noqa: E402
from arguments import positive_float  # noqa: E402
from adam_mini_kernels import AdamMini  # noqa: E402
from adam_mini_kernels import launch_tables as T  # noqa: E402

INT64 = 8


def traffic(pset: PS.ParamSet) -> dict:
    s = {"float32": 4, "bfloat16": 2, "float16": 2}[pset.dtype]
    named = [(n, torch.nn.Parameter(torch.empty(shape, device="meta"))) for n, shape in pset.shapes]
    summary = AdamMini(named, verbose=False, backend="torch", **pset.model_args).partition_summary()
    n_params = sum(math.prod(r["shape"]) for r in summary)
    num_v = sum(r["num_blocks"] for r in summary)
    minimum = 5 * s * n_params + 8 * num_v
    v1 = 0
    widths, has_tiles, has_adam = set(), False, False
    for r in summary:
        bn, nb = r["block_numel"], r["num_blocks"]
        if nb == 0:
            continue
        if r["rule"] == "adam":
            has_adam = True
            numel = bn * nb
            tiles = -(-numel // T.ADAM_TILE)
            v1 += 5 * s * numel + 8 * numel + tiles * T.ROW_COLS * INT64
        elif bn <= T.ROW_MAX:
            widths.add(max(T.MIN_ROW_BLOCK, 1 << max(bn - 1, 0).bit_length()))
            v1 += nb * (5 * s * bn + 8 + T.ROW_COLS * INT64)
        else:
            has_tiles = True
            tiles = -(-bn // T.TILE)
            per_block = (
                s * bn + tiles * (T.TILE_COLS * INT64 + 4)  # phase 1: g, tile rows, partial sums
                + T.LB_COLS * INT64 + 4 * tiles + 4  # phase 2: block row, partials, block sum
                + T.LB_COLS * INT64 + 4 + 8  # phase 3: block row, block sum, v
                + 5 * s * bn + tiles * T.TILE_COLS * INT64  # phase 4: g, p, m in; p, m out; tile rows
            )
            v1 += nb * per_block
    # One step_coefficients launch (every fused step), one per row class, four for large blocks
    # (tile_sumsq, block_sumsq, large_block_v, tile_step), one for the Adam tiles.
    launches = 1 + len(widths) + (4 if has_tiles else 0) + (1 if has_adam else 0)
    return dict(n_params=n_params, num_v=num_v, minimum=minimum, v1=v1, launches=launches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gbps", type=positive_float, default=2984.0, help="copy bandwidth, GB/s (default: SPEC's H100)")
    args = ap.parse_args(argv)
    print(f"Triton kernel v1, predicted traffic at {args.gbps:g} GB/s (bench/predict_bytes.py)\n")
    print("| set | params | minimum B/param | v1 B/param | v1 over minimum | floor ms | v1 predicted ms | kernel launches |")
    print("|---|---|---|---|---|---|---|---|")
    for key in PS.SET_KEYS:
        t = traffic(PS.make_set(key))
        n = t["n_params"]
        ms = lambda b: b / (args.gbps * 1e9) * 1e3  # noqa: E731
        print(
            f"| {key} | {n:,} | {t['minimum'] / n:.3f} | {t['v1'] / n:.3f} | {100 * (t['v1'] / t['minimum'] - 1):+.2f}% "
            f"| {ms(t['minimum']):.3f} | {ms(t['v1']):.3f} | {t['launches']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
