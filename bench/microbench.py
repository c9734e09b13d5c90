#!/usr/bin/env python
"""Per-kernel-path microbenchmarks of the fused backends, in GB/s, with ``triton.testing``.

    python bench/microbench.py                    # GPU only: all paths, results in bench/results/
    python bench/microbench.py --paths rows --dtypes float32
    python bench/microbench.py --dry-run          # CPU: tiny sizes once through Triton's
                                                  # interpreter, checked against the torch backend

Each benchmark steps one flat group (``adam_mini_kernels.buffers.FlatGroup``) whose blocks are all
of one kind, so that a backend's step launches exactly one path of its kernels:

* ``rows``: one parameter of R rows of W elements (an MLP weight, rule ``mlp``), W from 64 to
  8192 (``launch_tables.ROW_MAX``): ``rows_step_kernel``, one program per row, one pass.
* ``large``: blocks of 16K to 4M elements (query/key heads, rule ``wqk``): the four phases
  ``tile_sumsq_kernel``, ``block_sumsq_kernel``, ``large_block_v_kernel``, ``tile_step_kernel``.
* ``adam``: a bias-named parameter (rule ``adam``, one v per element): ``adam_step_kernel``.

Lines are backend x storage dtype: ``triton`` and ``cuda`` (the extension's step, when it is
built) and ``torch`` (the reference backend) for scale. Every point moves about 2^26 elements
(override with ``--numel``) so the buffers are far larger than L2. The backend's step is called directly
on the group (its coefficient table included), so no optimizer host code is timed.

GB/s counts the minimum bytes of the step (bench/NOTES.md): read p, g, m and write p, m
(5 x storage bytes per element) plus reading and writing the float32 v of each block (8 B per
element for adam). A path that moves more than that (the large-block path reads g twice) shows
it as fewer GB/s. Compare with the copy bandwidth that ``bench_step.py`` measures.
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Tuple  # noqa: E402

import torch  # noqa: E402

from arguments import nonnegative_float, positive_float, positive_int  # noqa: E402
from provenance import git_info, versions  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ROW_WIDTHS = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
LARGE_BLOCKS = [16384, 65536, 262144, 1048576, 4194304]
ADAM_SIZES = [2**16, 2**20, 2**24, 2**26]


# --------------------------------------------------------------------------------------------
# Groups of one kind of block
# --------------------------------------------------------------------------------------------
def make_group(path: str, size: int, numel: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A FlatGroup of about ``numel`` elements whose blocks all take ``path``, random p, g and m,
    positive v (as after a first step) and step counters at 1."""
    from adam_mini_kernels.buffers import FlatGroup
    from adam_mini_kernels.coefficients import advance_steps
    from adam_mini_kernels.partition import layout_for

    if path == "rows":
        rows = max(1, numel // size)
        name, shape, rule, head = "model.layers.0.mlp.up_proj.weight", (rows, size), "mlp", None
    elif path == "large":
        blocks = max(1, numel // size)
        name, shape, rule, head = "model.layers.0.self_attn.q_proj.weight", (blocks, size), "wqk", size
    elif path == "adam":
        name, shape, rule, head = "model.layers.0.mlp.up_proj.bias", (size,), "adam", None
    else:
        raise ValueError(path)
    layout = layout_for(name, shape, rule, head)
    assert layout.rule == rule, (layout, rule)
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=gen))
    p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    group = FlatGroup([p], [layout])
    group.m.copy_(torch.randn(group.m.shape, device=device, dtype=dtype, generator=gen).mul_(0.1))
    group.v.copy_(torch.rand(group.v.shape, device=device, generator=gen).add_(0.1))
    group.set_hparams(torch.tensor([[1e-3, 0.1, 0.9, 0.999, 1e-8]], dtype=torch.float64))
    advance_steps(group, None)
    return group, p


def min_bytes(group) -> int:
    """Read p, g, m and write p, m (storage dtype), read and write every float32 v value."""
    return 5 * sum(p.numel() for p in group.params) * group.param_buffer.element_size() + 8 * group.v.numel()


def providers(device: torch.device, wanted: List[str]) -> Tuple[Dict[str, Callable], Dict[str, str]]:
    """Step functions of the wanted backends that can run on ``device``, and why the others
    cannot (printed, never silently dropped)."""
    from adam_mini_kernels import dispatch

    ok, missing = {}, {}
    for name in wanted:
        backend = dispatch.BACKENDS.get(name)
        if backend is None:
            missing[name] = "no such backend"
            continue
        try:
            reason = backend.why_not([device])
        except Exception as err:  # noqa: BLE001
            reason = f"availability check raised {type(err).__name__}: {err}"
        if reason:
            missing[name] = reason
        else:
            ok[name] = backend.load()
    return ok, missing


# --------------------------------------------------------------------------------------------
# GPU benchmarks
# --------------------------------------------------------------------------------------------
def run_gpu(args) -> int:
    import triton
    import triton.testing

    device = torch.device("cuda", torch.cuda.current_device())
    steps, missing = providers(device, args.backends)
    for name, reason in missing.items():
        print(f"microbench: backend {name!r} not benchmarked: {reason}")
    if not steps:
        print("microbench: no backend to benchmark")
        return 1
    lines = [(b, d) for b in steps for d in args.dtypes]
    line_vals = [f"{b}-{SHORT[d]}" for b, d in lines]
    by_val = dict(zip(line_vals, lines))

    started, skipped = time.perf_counter(), []

    def measure(path: str, size: int, provider: str):
        backend, dtype_name = by_val[provider]
        if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
            skipped.append((path, size, provider))  # NaN: each benchmark still writes its csv and png
            return math.nan, math.nan, math.nan
        try:
            group, keep = make_group(path, size, args.numel, DTYPES[dtype_name], device)
            fn = steps[backend]
            ms, p20, p80 = triton.testing.do_bench(lambda: fn(group, None), warmup=args.warmup_ms, rep=args.rep_ms,
                                                    quantiles=[0.5, 0.2, 0.8])
            nbytes = min_bytes(group)
            del group, keep
            gbps = lambda t: nbytes / (t * 1e-3) / 1e9  # noqa: E731
            return gbps(ms), gbps(p80), gbps(p20)
        except Exception as err:  # noqa: BLE001 - one failing point must not end the report
            print(f"microbench: {path} size {size} {provider}: {type(err).__name__}: {err}")
            return math.nan, math.nan, math.nan
        finally:
            torch.cuda.empty_cache()

    benches = []
    common = dict(line_arg="provider", line_vals=line_vals, line_names=line_vals, ylabel="GB/s", x_log=True)
    if "rows" in args.paths:
        benches.append(triton.testing.Benchmark(
            x_names=["size"], x_vals=ROW_WIDTHS, xlabel="row width (elements per block)", plot_name="rows_step",
            args=dict(path="rows"), **common))
    if "large" in args.paths:
        benches.append(triton.testing.Benchmark(
            x_names=["size"], x_vals=LARGE_BLOCKS, xlabel="block size (elements), four phases", plot_name="large_blocks",
            args=dict(path="large"), **common))
    if "adam" in args.paths:
        benches.append(triton.testing.Benchmark(
            x_names=["size"], x_vals=[s for s in ADAM_SIZES if s <= max(args.numel, 2**16)],
            xlabel="elements (one v each)", plot_name="adam_tiles", args=dict(path="adam"), **common))

    name = torch.cuda.get_device_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    date = now.strftime("%Y-%m-%d")
    out = args.out / f"microbench_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}_{date}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"microbench on {name}: torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.numel:,} elements per point, dtypes {', '.join(args.dtypes)}; GB/s of the minimum bytes")
    write_meta(out, name, args.commit, now)
    report = triton.testing.perf_report(benches)(measure)
    report.run(print_data=True, save_path=str(out))
    if skipped:
        print(f"microbench: {len(skipped)} points not run (NaN): the time budget (--time-budget-s "
              f"{args.time_budget_s:g}) was used up, from {skipped[0][0]} size {skipped[0][1]} {skipped[0][2]} on")
    print(f"wrote {out}/ (csv and png per benchmark)")
    return 0


def write_meta(out: Path, device_name: str, commit, now: datetime.datetime) -> Path:
    """``out/meta.json``: where the CSVs and PNGs of ``out`` come from (device, torch, triton and
    CUDA versions, the commit benchmarked, the UTC date and time)."""
    meta = dict(
        device=device_name, **versions(), git=git_info(commit),
        date=now.strftime("%Y-%m-%d"), datetime_utc=now.isoformat(timespec="seconds"),
    )
    path = out / "meta.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# CPU dry run: the same code paths, tiny sizes, Triton's interpreter, checked against torch
# --------------------------------------------------------------------------------------------
def run_dry(args) -> int:
    device = torch.device("cpu")
    steps, missing = providers(device, args.backends)
    for name, reason in missing.items():
        print(f"dry run: backend {name!r} skipped: {reason}")
    reference = providers(device, ["torch"])[0]["torch"]
    points = {"rows": [16, 100, 512], "large": [8192 + 300, 3 * 4096], "adam": [1000, 3000]}
    tol = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
    failures = 0
    for path in args.paths:
        for size in points[path]:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                ref_group, keep_ref = make_group(path, size, 4 * size, dtype, device, seed=1)
                reference(ref_group, None)
                for backend, fn in steps.items():
                    group, keep = make_group(path, size, 4 * size, dtype, device, seed=1)
                    fn(group, None)
                    a, b = group.param_buffer.float(), ref_group.param_buffer.float()
                    err = ((a - b).norm() / b.norm()).item()
                    verr = ((group.v - ref_group.v).norm() / ref_group.v.norm()).item()
                    ok = err <= tol[dtype_name] and verr <= max(tol[dtype_name], 1e-5)
                    failures += not ok
                    print(f"dry run: {path:>5} size {size:>6} {dtype_name:>8} {backend:>6}: "
                          f"{min_bytes(group):>9} min bytes, rel err p {err:.2e}, v {verr:.2e} {'ok' if ok else 'MISMATCH'}")
    return 1 if failures else 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default="rows,large,adam", help="comma list from rows, large, adam")
    ap.add_argument("--backends", default="triton,cuda,torch", help="comma list of AdamMini backends")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list from float32, bfloat16, float16")
    ap.add_argument("--numel", type=positive_int, default=2**26, help="elements per point (default 2^26)")
    ap.add_argument("--warmup-ms", type=positive_float, default=50.0)
    ap.add_argument("--rep-ms", type=positive_float, default=300.0)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results go to OUT/microbench_<device>_<date>/")
    ap.add_argument("--time-budget-s", type=nonnegative_float, default=None,
                    help="start no point after this many seconds: the rest are NaN, and every benchmark still writes "
                         "its csv and png (a SIGINT would lose the one in progress)")
    ap.add_argument("--commit", help="the commit measured, where there is no git checkout (or BENCH_COMMIT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: run every path once at tiny sizes under TRITON_INTERPRET=1 and check it against the torch backend; no timing")
    args = ap.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.backends = [b for b in args.backends.split(",") if b]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for p in args.paths:
        if p not in ("rows", "large", "adam"):
            ap.error(f"unknown path {p!r}")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return run_dry(args)
    if not torch.cuda.is_available():
        print(
            "microbench.py measures GPU kernels and needs a CUDA GPU; torch sees none here.\n"
            "Run it on the GPU machine (bench/README.md), or use --dry-run to check the code paths "
            "on the CPU under Triton's interpreter.",
            file=sys.stderr,
        )
        return 2
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
