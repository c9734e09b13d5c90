#!/usr/bin/env python
"""Optimizer state bytes per parameter on Llama-1.1B shapes: AdamW, 8-bit AdamW, Adam-mini, AdamMini.

    python bench/memory_table.py                        # TinyLlama-1.1B shapes (~14 GB of RAM at most)
    python bench/memory_table.py --quick --out /tmp/m   # tiny Llama shapes, seconds (the CI test)

One optimizer at a time, on fresh parameters with the names and shapes of bench_step.py's
``llama-1.1b`` set (param_sets.py), in float32 or bfloat16 as the row says:

* torch ``AdamW``, ``torchao.optim.AdamW8bit``, ``bitsandbytes.optim.AdamW8bit`` and official
  ``adam_mini.Adam_mini`` 1.1.1 allocate their state in their first step: each takes one step
  with gradients of ones. An optimizer that is not installed or cannot step here is a row saying
  why, never dropped.
* ``AdamMini`` (fp32 and bf16 parameters, ``m`` in their dtype or ``state_dtype=torch.int8``)
  allocates its whole state (the flat ``m`` and ``v`` buffers, int8 codes and scales) when its
  first ``step()`` builds the flat buffers, before any update. Its rows take that first step with
  no gradients (so it builds and updates nothing): on the CPU the torch backend's update of a
  1.1B-parameter group needs float32 temporaries of several times the group's size (~35 GB), more
  than a small machine has. ``--quick`` (and ``--update-adam-mini``) then also steps them with
  gradients and records the state bytes after that update, which the CI test checks are the same.
  ``--quick`` also turns ``torch.compile`` off, so torchao's step runs eagerly (compiling it takes
  a minute; its state is the same).

The state is the distinct storages reachable from ``opt.state`` (``bench_step.state_bytes``; the
flat parameter and gradient buffers of AdamMini replace the model's own tensors and are not
state), over the number of parameters. State bytes do not depend on the device: this runs on the
CPU. To fit 1.1B parameters in memory, parameters are allocated uninitialized (``torch.empty``:
pages not written yet take no memory, and the state's size does not depend on the values) and
each gradient is one value expanded to the parameter's shape (no memory). Results:
``<out>/memory_table_cpu_<date>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench_step  # noqa: E402
import param_sets as PS  # noqa: E402
from provenance import git_info  # noqa: E402

HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
INT8_LIMIT = 1.1  # issue 10: int8 AdamMini state bytes per parameter on Llama-1.1B shapes
DEVICE_NOTE = "CPU, state bytes are device-independent"


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    dtype: torch.dtype  # of the parameters and gradients
    state: str  # what the state holds, for the table
    module: Optional[str]  # the package it needs, besides torch and this one
    build: Callable[[list, dict], torch.optim.Optimizer]  # (named params, model args)

    @property
    def ours(self) -> bool:
        return self.id.startswith("ours")


def _adamw(named, _):
    return torch.optim.AdamW([p for _, p in named], foreach=False, **HPARAMS)  # per tensor: small temporaries


def _torchao(named, _):
    from torchao.optim import AdamW8bit

    return AdamW8bit([p for _, p in named], **HPARAMS)


def _bnb(named, _):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for _, p in named], **HPARAMS)


def _official(named, model_args):
    from adam_mini import Adam_mini

    return Adam_mini(named, **HPARAMS, **model_args, verbose=False)


def _ours(state_dtype):
    def build(named, model_args):
        from adam_mini_kernels import AdamMini

        return AdamMini(named, **HPARAMS, **model_args, verbose=False, backend="torch", state_dtype=state_dtype)

    return build


ROWS = [
    Row("adamw", "torch AdamW", torch.float32, "m, v float32", None, _adamw),
    Row("adamw8bit-torchao", "torchao AdamW8bit", torch.float32, "m, v 8-bit + scales", "torchao", _torchao),
    Row("adamw8bit-bnb", "bitsandbytes AdamW8bit", torch.float32, "m, v 8-bit + scales", "bitsandbytes", _bnb),
    Row("official", "official Adam-mini 1.1.1", torch.float32, "m float32, v per block", "adam_mini", _official),
    Row("ours-fp32", "AdamMini, fp32 params", torch.float32, "m float32, v per block", None, _ours(None)),
    Row("ours-bf16", "AdamMini, bf16 params", torch.bfloat16, "m bf16, v per block (fp32)", None, _ours(None)),
    Row("ours-fp32-int8", "AdamMini int8, fp32 params", torch.float32, "m int8 + scales, v per block",
        None, _ours(torch.int8)),
    Row("ours-bf16-int8", "AdamMini int8, bf16 params", torch.bfloat16, "m int8 + scales, v per block",
        None, _ours(torch.int8)),
]


def make_params(pset: PS.ParamSet, dtype: torch.dtype) -> list:
    """(name, parameter) of the set, uninitialized, without gradients."""
    return [(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype))) for name, shape in pset.shapes]


def give_grads(named: list) -> None:
    """Gradients of ones, each a single value expanded to its parameter's shape."""
    for _, p in named:
        p.grad = torch.ones((), dtype=p.dtype).expand(p.shape)


def _missing(module: Optional[str]) -> Optional[str]:
    """Why ``module`` cannot be imported, or None."""
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - absent or broken: a row that says so
        return f"{module} is not importable ({type(err).__name__}: {err})"
    return None


def measure(row: Row, pset: PS.ParamSet, update_ours: bool) -> Dict[str, object]:
    """One row: build the optimizer, take its first step, count the state."""
    out: Dict[str, object] = dict(id=row.id, label=row.label, params_dtype=str(row.dtype).replace("torch.", ""),
                                  state=row.state)
    reason = _missing(row.module)
    if reason:
        return dict(out, status="not runnable", reason=f"not runnable here: {reason}")
    start = time.perf_counter()
    named = make_params(pset, row.dtype)
    try:
        if not row.ours:
            give_grads(named)
        opt = row.build(named, pset.model_args)
        opt.step()
        n = pset.n_params
        out.update(status="ok", state_bytes=bench_step.state_bytes(opt))
        out["bytes_per_param"] = out["state_bytes"] / n
        if row.ours:
            out["first_step"] = "no gradients: builds the state, updates nothing"
            if update_ours:
                give_grads(named)
                opt.step()
                out["state_bytes_after_update"] = bench_step.state_bytes(opt)
        else:
            out["first_step"] = "gradients of ones"
    except Exception as err:  # noqa: BLE001 - an optimizer that cannot step here is a row
        out.update(status="not runnable", reason=f"not runnable here: {type(err).__name__}: {err}"[:500])
    finally:
        opt = named = None
        gc.collect()
    out["seconds"] = time.perf_counter() - start
    return out


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def markdown(report: dict) -> str:
    """The table."""
    s = report["set"]
    lines = [
        f"# Optimizer state bytes per parameter ({DEVICE_NOTE}; {report['date']})",
        "",
        f"{s['title']}: {s['description']}, {s['n_params']:,} parameters. State: the distinct storages "
        "reachable from `opt.state` after the first step (AdamMini: the step that builds its flat buffers), "
        f"over the number of parameters. torch {report['versions']['torch']}, commit {report['git']['commit']}.",
        "",
        "| optimizer | params | state | state bytes | bytes/param |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['params_dtype']} | {r['reason']} | | |")
            continue
        lines.append(f"| {r['label']} | {r['params_dtype']} | {r['state']} | {r['state_bytes']:,} | "
                     f"{r['bytes_per_param']:.3f} |")
    c = report["int8_criterion"]
    if c:
        lines += ["", f"Issue 10: int8 AdamMini state <= {INT8_LIMIT} bytes/param: "
                  + ", ".join(f"{k} {v['bytes_per_param']:.3f} ({'pass' if v['pass'] else 'FAIL'})" for k, v in c.items())
                  + ("" if report["full_shapes"] else " (tiny shapes: not the issue's measurement)") + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny Llama shapes (the CI test)")
    ap.add_argument("--update-adam-mini", action="store_true",
                    help="also step AdamMini with gradients and count again (always on with --quick)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--commit", help="commit measured, when this is no git checkout")
    args = ap.parse_args(argv)

    if args.quick:  # torchao compiles its step: a minute on tiny shapes; eager, the state is the same
        torch._dynamo.config.disable = True
    pset = PS.make_set("llama-1.1b-fp32", smoke=args.quick)
    pset.title = pset.title.replace(", fp32", "")
    rows = []
    for row in ROWS:
        rows.append(measure(row, pset, args.quick or args.update_adam_mini))
        r = rows[-1]
        print(f"{row.label}: " + (f"{r['bytes_per_param']:.3f} B/param" if r["status"] == "ok" else r["reason"]),
              flush=True)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # the UTC date, as bench_step.py's files
    report = {
        "date": date,
        "device": bench_step.device_info(torch.device("cpu")),
        "note": DEVICE_NOTE,
        "versions": dict(torch=torch.__version__, adam_mini_kernels=_version("adam-mini-kernels"),
                         adam_mini=_version("adam-mini"), torchao=_version("torchao"),
                         bitsandbytes=_version("bitsandbytes")),
        "git": git_info(args.commit),
        "full_shapes": not args.quick,
        "torch_compile": "disabled (--quick): torchao's step runs eagerly" if args.quick else "enabled",
        "set": dict(key=pset.key, title=pset.title, description=pset.description, n_params=pset.n_params,
                    n_tensors=pset.n_tensors, model_args=pset.model_args),
        "hparams": HPARAMS,
        "rows": rows,
        "int8_criterion": {
            r["id"]: {"bytes_per_param": r["bytes_per_param"], "pass": r["bytes_per_param"] <= INT8_LIMIT}
            for r in rows if r["id"].endswith("-int8") and r["status"] == "ok"
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_table_cpu_{date}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"results: {stem}.json / .md")
    return stem


if __name__ == "__main__":
    main()
