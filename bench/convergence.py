"""Convergence: the `make demo` tiny GPT trained with AdamMini, official adam-mini and AdamW.

Every run starts from the same initial weights and sees the same batches (``--seed``: the init
and data seed, default the demo's) of the Python standard library's sources (``demo/train.py``'s corpus, no download);
the hyperparameters (lr schedule, betas, eps, weight decay with the official no-decay names) are
the same for every optimizer. Runs:

* ``official``: ``adam_mini.Adam_mini`` 1.1.1 (the oracle), partition by names.
* ``official (1 ulp)``: the same, one initial weight moved by one float32 ulp: the noise floor of
  criterion (1) (see [Note: noise floor]).
* ``AdamMini[<backend>]``: ours, same name partition as official, one run per backend asked for
  (``--backends``; by default every backend, one that cannot run on the device being a row that
  says why, never left out). The
  Triton interpreter on the CPU is far too slow for a full run: asking for ``triton`` on the CPU
  runs it (under ``TRITON_INTERPRET=1``) for ``--interpreter-steps`` steps only, which is said in
  the results.
* ``AdamMini[int8]``: ours on the torch backend with ``state_dtype=torch.int8`` (m as 8-bit codes
  and a float32 scale per 256-element chunk), same name partition as official.
* ``AdamMini.for_model``: ours with the module-derived partition (position embeddings one block
  per position instead of one block, the rest as official).
* ``AdamW``: ``torch.optim.AdamW``.

Written to ``bench/results/convergence_<device>_<date>.{json,md,png}`` (``--out`` to change):
the per-step training losses, the validation losses, and the issues' criteria, evaluated and
reported, never asserted: (1) each ``AdamMini[<backend>]`` curve equals official's, relative
difference < 1e-3 at every logged step (training loss every step, validation loss every eval),
(2) its final validation loss within 1% of AdamW's (issue 9), and (3) the final validation loss
of ``AdamMini[int8]`` within 1% of the float32-state ``AdamMini[torch]`` run's (issue 10). A
``--seed`` other than the default adds ``_seed<N>`` to the file names.

    python bench/convergence.py                 # CPU: the demo model, 500 steps (~5 min, 2 cores)
    python bench/convergence.py --seed 1        # the same with other initial weights and batches
    python bench/convergence.py --lr 1e-3 --tag lr1e-3   # the same at another peak lr
    python bench/convergence.py --preset gpu    # GPU: ~26M parameters, 3000 steps
    python bench/convergence.py --preset smoke --out /tmp/conv   # seconds (CI)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from demo.tiny_gpt import GPTConfig, TinyGPT  # noqa: E402
from demo.train import NO_DECAY, SEED, RunConfig, evaluate, get_batch, load_corpus, lr_at  # noqa: E402
from arguments import nonnegative_float, positive_int  # noqa: E402
from provenance import git_info, versions  # noqa: E402

PRESETS = {
    "smoke": RunConfig(GPTConfig(block_size=32, n_layer=1, n_head=2, dim=32), steps=6, batch_size=4, eval_every=3,
                       val_batches=2),
    "cpu": RunConfig(GPTConfig()),  # the `make demo` model: 0.87M parameters
    "gpu": RunConfig(GPTConfig(block_size=256, n_layer=8, n_head=8, dim=512), steps=3000, batch_size=32, lr=1e-3,
                     eval_every=100, val_batches=20),
}
HPARAMS = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CURVE_RTOL = 1e-3  # criterion 1: |ours - official| / official at every logged step
FINAL_RTOL = 0.01  # criteria 2 and 3: relative difference of the final validation loss
INT8_RUN = "AdamMini[int8]"  # criterion 3: against the float32-state run FP32_RUN
FP32_RUN = "AdamMini[torch]"
# [Note: noise floor] official again, with one initial weight (position 0's first embedding value,
# read by every sequence) moved by one float32 ulp: how far
# official's own curve drifts from a last-bit difference, which any implementation that does not
# repeat official's float32 operations in its exact order (every fused one) starts with.
PERTURBED = "official (1 ulp)"


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def backend_of(run: str) -> Optional[str]:
    """The backend of an ``AdamMini[<backend>]`` run, else None."""
    return run[9:-1] if run.startswith("AdamMini[") and run != INT8_RUN else None


def make_optimizer(run: str, model: TinyGPT, cfg: RunConfig):
    """The optimizer of run ``run`` ("official", "AdamMini[<backend>]", "AdamMini[int8]",
    "AdamMini.for_model", "AdamW")."""
    dims = dict(dim=cfg.model.dim, n_heads=cfg.model.n_head)
    if run in ("official", PERTURBED):
        from adam_mini import Adam_mini

        return Adam_mini(model.named_parameters(), lr=cfg.lr, **HPARAMS, **dims, verbose=False)
    from adam_mini_kernels import AdamMini

    if run == "AdamMini.for_model":
        return AdamMini.for_model(model, lr=cfg.lr, **HPARAMS, **dims, verbose=False, backend="torch")
    if run == INT8_RUN:
        return AdamMini(model.named_parameters(), lr=cfg.lr, **HPARAMS, **dims, verbose=False, backend="torch",
                        state_dtype=torch.int8)
    if backend_of(run):
        return AdamMini(model.named_parameters(), lr=cfg.lr, **HPARAMS, **dims, verbose=False, backend=backend_of(run))
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in NO_DECAY)]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in NO_DECAY)]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, **HPARAMS)


def train(run: str, cfg: RunConfig, train_data, val_set, device: str, seed: int,
          stop: Optional[int] = None) -> Dict[str, object]:
    """One run from ``seed`` (initial weights and batches); per-step training loss, validation
    loss every ``eval_every`` steps. ``stop``: end after that many steps (same lr schedule as the
    full run, so the curve is the full run's beginning)."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg.model).to(device)
    if run == PERTURBED:
        with torch.no_grad():
            first = model.wpe.weight.view(-1)  # position 0: in every sequence
            first[0] = torch.nextafter(first[0], torch.tensor(float("inf"), device=first.device))
    opt = make_optimizer(run, model, cfg)
    gen = torch.Generator().manual_seed(seed)
    train_loss: List[float] = []
    evals: List[Dict[str, float]] = []
    start = time.perf_counter()
    steps = min(stop or cfg.steps, cfg.steps)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        x, y = get_batch(train_data, cfg, gen, device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, "val": evaluate(model, val_set)})
    return {"steps": steps, "train_loss": train_loss, "evals": evals, "seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters())}


def final_rel(run: dict, reference: dict) -> float:
    """(run - reference) / reference of the final validation loss."""
    return (run["evals"][-1]["val"] - reference["evals"][-1]["val"]) / reference["evals"][-1]["val"]


def curve_diff(run: dict, official: dict) -> Tuple[float, Optional[int], int]:
    """(largest relative difference from official's curve, first step where it exceeds
    CURVE_RTOL or None, steps compared) over the per-step training losses and the evals."""
    n = min(run["steps"], official["steps"])
    per_step = {s + 1: abs(a - b) / abs(b) for s, (a, b) in enumerate(zip(run["train_loss"][:n], official["train_loss"][:n]))}
    official_val = {e["step"]: e["val"] for e in official["evals"]}
    for e in run["evals"]:
        if e["step"] in official_val:
            b = official_val[e["step"]]
            per_step[e["step"]] = max(per_step.get(e["step"], 0.0), abs(e["val"] - b) / abs(b))
    over = [s for s, d in sorted(per_step.items()) if d >= CURVE_RTOL]
    return max(per_step.values(), default=float("nan")), (over[0] if over else None), n


def criteria(results: Dict[str, dict]) -> Dict[str, dict]:
    """The issues' criteria for every AdamMini run, and the noise floor (see [Note: noise
    floor]) for the perturbed official run."""
    out = {}
    trained = {run: r for run, r in results.items() if "train_loss" in r}  # not_run rows compare with nothing
    official, adamw, fp32 = trained.get("official"), trained.get("AdamW"), trained.get(FP32_RUN)
    for run, r in trained.items():
        if not (run.startswith("AdamMini") or run == PERTURBED):
            continue
        row: Dict[str, object] = {}
        if official is not None and (backend_of(run) or run == PERTURBED):
            diff, first_over, n = curve_diff(r, official)
            row.update(curve_rel_diff_vs_official=diff, curve_first_step_over=first_over, curve_steps_compared=n)
            if run != PERTURBED:
                row["curve_equal"] = diff < CURVE_RTOL
        if adamw is not None and r["steps"] == adamw["steps"] and run != PERTURBED:
            final = final_rel(r, adamw)
            row.update(final_val_rel_vs_adamw=final, final_within_1pct=abs(final) < FINAL_RTOL)
        if run == INT8_RUN and fp32 is not None and r["steps"] == fp32["steps"]:
            final = final_rel(r, fp32)
            row.update(final_val_rel_vs_fp32_state=final, int8_final_within_1pct=abs(final) < FINAL_RTOL)
        out[run] = row
    return out


def markdown(report: dict) -> str:
    """The results table."""
    lines = [
        f"# Convergence: tiny GPT on stdlib sources ({report['device']['name']}, {report['date']})",
        "",
        f"Model {report['model']} ({report['params'] or 0:,} parameters), {report['config']['steps']} steps, batch "
        f"{report['config']['batch_size']} x {report['config']['model']['block_size']} bytes, peak lr "
        f"{report['config']['lr']}, betas {HPARAMS['betas']}, weight decay {HPARAMS['weight_decay']}; same "
        "initial weights and batches for every run. Criteria: (1) curve equal to official's, relative "
        f"difference < {CURVE_RTOL:g} at every logged step; (2) final val loss within {FINAL_RTOL:.0%} of AdamW's; "
        f"(3) final val loss of {INT8_RUN} (state_dtype=torch.int8) within {FINAL_RTOL:.0%} of {FP32_RUN}'s "
        f"(float32 state). Init and data seed {report['seed']}. The row {PERTURBED!r} is official again from "
        "the same initial weights but one (read by every sequence) moved by one float32 ulp: its difference from official is the noise "
        "floor of criterion (1), how far a last-bit difference carries (first step over the threshold in brackets).",
        "",
        *([] if report.get("complete", True) else
          ["**Incomplete**: the script was stopped early or is still running; the runs not listed were not run yet.", ""]),
        f"| run | steps | final train loss (mean of last 10) | final val loss | time (s) | max rel diff vs official | (1) "
        f"| val vs AdamW | (2) | val vs {FP32_RUN} | (3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, r in report["results"].items():
        if "train_loss" not in r:
            lines.append(f"| {run} | not run: {r['not_run']} | | | | | | | | | |")
            continue
        c = report["criteria"].get(run, {})
        diff = c.get("curve_rel_diff_vs_official")
        vs = c.get("final_val_rel_vs_adamw")
        vs_fp32 = c.get("final_val_rel_vs_fp32_state")
        tail = r["train_loss"][-10:]
        final_val = f"{r['evals'][-1]['val']:.4f}" if r["evals"] else "-"
        first = c.get("curve_first_step_over")
        diff_text = f"{diff:.2e}" + (f" (step {first})" if first else "") if diff is not None else ""
        verdict = "noise floor" if run == PERTURBED else ("pass" if c.get("curve_equal") else "FAIL")
        lines.append(
            f"| {run} | {r['steps']}{' (' + r['note'] + ')' if 'note' in r else ''} | {sum(tail) / len(tail):.4f} | {final_val} | {r['seconds']:.1f} | "
            + (f"{diff_text} | {verdict}" if diff is not None else " | ")
            + " | "
            + (f"{vs:+.2%} | {'pass' if c['final_within_1pct'] else 'FAIL'}" if vs is not None else " | ")
            + " | "
            + (f"{vs_fp32:+.2%} | {'pass' if c['int8_final_within_1pct'] else 'FAIL'}" if vs_fp32 is not None else " | ")
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Training loss (smoothed over 10 steps) and validation loss of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run, r in report["results"].items():
        if "train_loss" not in r:
            continue
        loss = r["train_loss"]
        smooth = [sum(loss[max(0, i - 9): i + 1]) / len(loss[max(0, i - 9): i + 1]) for i in range(len(loss))]
        line, = ax.plot(range(1, len(loss) + 1), smooth, lw=1, alpha=0.6, label=f"{run} train (10-step mean)")
        ax.plot([e["step"] for e in r["evals"]], [e["val"] for e in r["evals"]], color=line.get_color(), marker="o",
                ms=3, lw=2, ls="--", label=f"{run} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title=f"Tiny GPT convergence, {report['device']['name']}")
    ax.grid(alpha=0.3)
    if ax.lines:  # none before the first finished run
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _resumed(paths: List[Path], dev: dict, cfg: RunConfig, seed: int) -> Tuple[Dict[str, dict], dict]:
    """(the finished runs, what was resumed) of the first results file of ``paths`` from this
    device, which must come from the same configuration and seed (else SystemExit: those are the
    caller's choice). Files of another device, and missing ones, are passed over with a warning,
    and with none of this device every run starts fresh: which GPU a lease gets is not the
    caller's choice (an H200 instead of an H100), and refusing would waste the lease, while
    curves of two devices must not be mixed in one file."""
    passed_over = []
    for path in paths:
        if not path.exists():  # e.g. the file of the GPU kind no lease has drawn yet
            passed_over.append(f"{path} (no such file)")
            continue
        old = json.loads(path.read_text())
        if old["device"]["name"] != dev["name"]:
            passed_over.append(f"{path} ({old['device']['name']})")
            continue
        same = {"config": old["config"] == json.loads(json.dumps(asdict(cfg))), "seed": old["seed"] == seed}
        if not all(same.values()):
            raise SystemExit(f"--resume {path}: another {', '.join(k for k, v in same.items() if not v)} than this run's")
        kept = {run: r for run, r in old["results"].items() if "train_loss" in r}
        return kept, {"from": str(path), "runs_kept": sorted(kept), "passed_over": passed_over}
    print(f"convergence: WARNING: --resume: no file of this device ({dev['name']}): "
          f"{'; '.join(passed_over)}; every run starts fresh", file=sys.stderr, flush=True)
    return {}, {"from": None, "runs_kept": [], "passed_over": passed_over}


def _report(dev: dict, date: str, seed: int, cfg: RunConfig, results: Dict[str, dict], complete: bool,
            resumed: Optional[dict] = None) -> dict:
    """The results file's content; ``complete``: every run was tried (not stopped early);
    ``resumed``: what --resume kept (None without it)."""
    done = [r for r in results.values() if "params" in r]
    return {
        "device": dev, "date": date, "seed": seed, **versions(), "git": git_info(None), "model": asdict(cfg.model),
        "params": done[0]["params"] if done else None, "config": asdict(cfg), "hparams": HPARAMS,
        "complete": complete, "results": results, "criteria": criteria(results),
        **({"resumed": resumed} if resumed is not None else {}),
    }


def main(argv: Optional[List[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on a CUDA device, else cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=positive_int, help="override the preset's steps")
    ap.add_argument("--lr", type=nonnegative_float, help="override the preset's peak lr (the same for every optimizer)")
    ap.add_argument("--backends", help="AdamMini backends, comma-separated (default: every one; those that cannot "
                                       "run here are rows saying why)")
    ap.add_argument("--interpreter-steps", type=positive_int, default=10,
                    help="steps of a triton run on the CPU (Triton's interpreter is slow)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seed", type=int, default=SEED, help=f"initial weights and batches (default {SEED}, the demo's)")
    ap.add_argument("--tag", help="suffix of the output file names")
    ap.add_argument("--time-budget-s", type=nonnegative_float,
                    help="start no run that would end after this many seconds at the pace of the longest run so far "
                         "(the others are reported as not run); the files are rewritten after every run, so a "
                         "stopped run leaves the finished ones")
    ap.add_argument("--resume", type=Path, nargs="+",
                    help="results JSONs of this script; the first of this device (it must have the same preset, steps "
                         "and seed) has its finished runs kept and only the others run (a run split over several GPU "
                         "leases); with none of this device, a warning and every run starts fresh")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    wanted = args.backends.split(",") if args.backends else None
    interpret = device.type == "cpu" and (wanted is None or "triton" in wanted) and _importable("triton")
    if interpret:  # before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    from adam_mini_kernels import available_backends, dispatch

    cfg = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_float32_matmul_precision("highest")  # fp32 curves: no TF32 on GPUs

    available = available_backends([device])
    # Every backend by default, fastest first: one that cannot run here is a row with the reason
    # (an unbuilt CUDA extension must show, not drop out of the table).
    wanted = wanted or list(dispatch.PREFERENCE)
    data = load_corpus()
    split = int(0.9 * len(data))
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_set = [get_batch(data[split:], cfg, val_gen, args.device) for _ in range(cfg.val_batches)]

    # The criteria's runs first (official, AdamW, ours, int8), then the noise floor and for_model:
    # under a time budget the first ones are what matters most.
    runs = ["official", "AdamW"] + [f"AdamMini[{b}]" for b in wanted] + [INT8_RUN, PERTURBED, "AdamMini.for_model"]
    dev = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
           "threads": torch.get_num_threads()}
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # the UTC date, as bench_step.py's files
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (f"_seed{args.seed}" if args.seed != SEED else "") + (f"_{_slug(args.tag)}" if args.tag else "")
    stem = args.out / f"convergence_{_slug(dev['name'])}_{date}{suffix}"
    results: Dict[str, dict] = {}
    kept, resumed = _resumed(args.resume, dev, cfg, args.seed) if args.resume else ({}, None)
    start = time.perf_counter()
    failed = []
    for run in runs:
        backend = backend_of(run)
        elapsed = time.perf_counter() - start
        longest = max((r["seconds"] for r in results.values() if "seconds" in r), default=0.0)
        if run in kept:
            results[run] = kept[run]
        elif backend is not None and backend not in available:  # said whatever the time left
            why = dispatch.BACKENDS[backend].why_not([device]) if backend in dispatch.BACKENDS else "no such backend"
            results[run] = {"not_run": f"backend {backend!r} cannot run on {device.type} here: {why} (available: {available})"}
        elif args.time_budget_s is not None and elapsed + longest > args.time_budget_s:
            results[run] = {"not_run": f"the time budget ({args.time_budget_s:.0f} s) would be spent before this run "
                                       f"ends ({elapsed:.0f} s gone, runs so far took up to {longest:.0f} s)"}
        else:
            interpreted = backend == "triton" and device.type == "cpu"
            stop = args.interpreter_steps if interpreted else None
            try:
                results[run] = train(run, cfg, data[:split], val_set, args.device, args.seed, stop)
            except ImportError as err:  # official missing
                results[run] = {"not_run": str(err)}
            except Exception as err:  # a row, as bench_step.py's: the other runs still run
                failed.append(run)
                results[run] = {"not_run": f"failed: {type(err).__name__}: {err}"[:500], "failed": True}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if interpreted and "steps" in results[run]:
                results[run]["note"] = f"Triton interpreter (CPU): the first {results[run]['steps']} steps only"
        print(f"{run}: {results[run].get('not_run') or '%.1f s' % results[run]['seconds']}", flush=True)
        report = _report(dev, date, args.seed, cfg, results, complete=run == runs[-1], resumed=resumed)
        _write(stem.with_suffix(".json"), json.dumps(report, indent=1))
        _write(stem.with_suffix(".md"), markdown(report))
        plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"results: {stem}.json / .md / .png")
    if failed:
        raise SystemExit(f"convergence: {len(failed)} run(s) failed: {', '.join(failed)} (their rows say why)")
    return stem


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole: a stop mid-write (SIGINT at a lease's limit) leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
