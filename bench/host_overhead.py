#!/usr/bin/env python
"""Host time of AdamMini's front-end: what ``opt.step()`` costs on the CPU besides its kernels.

    python bench/host_overhead.py                 # writes bench/results/host_overhead_<device>_<UTC date>.{json,md}
    python bench/host_overhead.py --quick --out /tmp/h   # a few hundred steps (the CI test)

Every step runs the Python front-end over each parameter (gradient aliasing, hyperparameters,
buffer keys) before it launches the fused step. A step whose kernels take less time than that
(small models, eager mode) is host-bound, so this is measured on its own: the backend's step is
replaced by a no-op, leaving everything else of ``opt.step()``. The parameter sets have the
tensor count and names of GPT-2 small (148 tensors) and TinyLlama-1.1B (201 tensors) with tiny
shapes (the front-end's cost does not depend on sizes). Two ways to train: a constant lr, and an
LR scheduler (``LambdaLR``) that changes every param group's lr before each step (the usual case:
the hyperparameter table is then re-read, checked and uploaded every step); the scheduler's own
``step()`` is not timed. Each step is timed alone (``time.perf_counter``), after warm-up, and
the timed steps are taken in blocks of ``BLOCK``, the rows' blocks in turn: reported are the best block's mean (the least
disturbed by other work on the machine: a shared virtual CPU makes single steps vary twofold)
and the 20th, 50th and 80th percentiles of the block means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import param_sets as P  # noqa: E402
from arguments import positive_int  # noqa: E402
from provenance import git_info, versions  # noqa: E402

from adam_mini_kernels import AdamMini  # noqa: E402
from adam_mini_kernels.dispatch import BackendStep  # noqa: E402

SETS = {  # name -> (shapes, optimizer dims): real tensor counts and names, tiny shapes
    "gpt2-small tensors (148)": (
        P.gpt2_shapes(P.GPT2Config(dim=64, n_layers=12, n_heads=4, vocab=512, n_positions=128)), dict(dim=64, n_heads=4)
    ),
    "tinyllama-1.1b tensors (201)": (
        P.llama_shapes(P.LlamaConfig(dim=64, n_layers=22, n_heads=4, n_kv_heads=2, ffn=172, vocab=512)),
        dict(dim=64, n_heads=4, n_kv_heads=2),
    ),
}


BLOCK = 50  # timed steps per block


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Row:
    """One parameter set and lr mode: an optimizer whose backend step is a no-op."""

    def __init__(self, shapes, dims, device, scheduled: bool):
        named = [(n, torch.nn.Parameter(torch.randn(s, device=device))) for n, s in shapes]
        self.opt = AdamMini(named, lr=1e-3, weight_decay=0.1, verbose=False, **dims)
        for _, p in named:
            p.grad = torch.randn_like(p)
        self.opt.step()  # builds the buffers and re-points parameters and gradients
        self.opt._step_fn = BackendStep(lambda group, inv_scale: (None, None, None), lambda *args: None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1.0 + 0.01 * s)) if scheduled else None
        self.tensors, self.blocks = len(shapes), []

    def block(self) -> float:
        """The mean microseconds of ``opt.step()`` over BLOCK steps, each timed alone."""
        total = 0.0
        for _ in range(BLOCK):
            start = time.perf_counter()
            self.opt.step()
            total += time.perf_counter() - start
            if self.scheduler is not None:
                self.scheduler.step()  # a new lr in every param group for the next step
        return total / BLOCK * 1e6

    def summary(self) -> dict:
        b = self.blocks
        return dict(tensors=self.tensors, backend=self.opt.backend, best_block_us=min(b), median_us=statistics.median(b),
                    p20_us=_percentile(b, 0.2), p80_us=_percentile(b, 0.8), steps=len(b) * BLOCK, blocks=len(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=positive_int, default=3000, help="timed steps per row")
    ap.add_argument("--quick", action="store_true", help="200 timed steps per row (the CI smoke test)")
    ap.add_argument("--commit", help="the commit measured, where there is no git checkout")
    ap.add_argument("--tag", help="suffix of the output file names")
    args = ap.parse_args(argv)
    steps = 200 if args.quick else args.steps
    device = torch.device(args.device)
    runs = {(name, "LambdaLR every step" if scheduled else "constant"): Row(shapes, dims, device, scheduled)
            for name, (shapes, dims) in SETS.items() for scheduled in (False, True)}
    # Blocks of the rows taken in turn, so that a slow phase of the machine falls on all of them.
    for k in range(max(1, steps // BLOCK) + 2):
        for run in runs.values():
            mean = run.block()
            if k >= 2:  # two warm-up blocks
                run.blocks.append(mean)
    rows = []
    for (name, lr), run in runs.items():
        row = dict(set=name, lr=lr, **run.summary())
        rows.append(row)
        print(f"{name}, lr {lr}: best block {row['best_block_us']:.0f} us, median {row['median_us']:.0f} "
              f"(p20 {row['p20_us']:.0f}, p80 {row['p80_us']:.0f})")
    # Named as bench_step.py names its files: the GPU's name (a CPU: "cpu", as convergence.py does)
    # and the UTC date.
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    result = dict(
        date=date, device=str(device), device_name=name, machine=platform.processor() or platform.machine(),
        python=platform.python_version(), **versions(), git=git_info(args.commit), rows=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    stem = args.out / f"host_overhead_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}_{date}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# AdamMini front-end host time per step ({name}, {date})", "",
        f"torch {torch.__version__} (CUDA {result['cuda']}), triton {result['triton']}, Python {result['python']}, commit {result['git']['commit']}"
        f"{' (dirty)' if result['git']['dirty'] else ''}. The backend's step is a no-op: this is the Python "
        "front-end alone (see bench/host_overhead.py).", "",
        f"Microseconds per step, means of blocks of {BLOCK} steps.", "",
        "| parameter set | lr | best block | p20 | median | p80 |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['set']} | {r['lr']} | {r['best_block_us']:.0f} | {r['p20_us']:.0f} | {r['median_us']:.0f} | "
              f"{r['p80_us']:.0f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
