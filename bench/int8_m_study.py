"""Which 8-bit format for Adam-mini's first moment? A convergence measurement (issue 10).

Trains the ``make demo`` tiny GPT (stdlib text, same seed, batches and schedule as demo/train.py)
with AdamMini (torch backend, float32 parameters) while storing ``m`` in each candidate format of
``adam_mini_kernels/quantization.py``: after every step, each quantized parameter's ``m`` is
replaced by dequantize(quantize(m)), which is exactly what a fused kernel that dequantizes,
updates in float32 and requantizes computes. Formats: float32 (the reference), linear and
sqrt-companded codes, each rounded to nearest and stochastically. Parameters with fewer than
``--min-size`` elements and Adam (bias) blocks keep float32 ``m``.

    python bench/int8_m_study.py            # CPU: ~1 min per format on 2 cores
    python bench/int8_m_study.py --quick    # smoke

Writes bench/results/int8_m_study_<device>_<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from adam_mini_kernels import AdamMini  # noqa: E402
from adam_mini_kernels.partition import ADAM  # noqa: E402
from adam_mini_kernels.quantization import dequantize, quantize  # noqa: E402
from demo import train as demo  # noqa: E402
from demo.tiny_gpt import TinyGPT  # noqa: E402
from arguments import nonnegative_int  # noqa: E402

FORMATS = {  # name: (code map, stochastic rounding); None: float32 m
    "float32": None,
    "linear-nearest": ("linear", False),
    "linear-stochastic": ("linear", True),
    "sqrt-nearest": ("sqrt", False),
    "sqrt-stochastic": ("sqrt", True),
}


def requantize_m(opt: AdamMini, code_map: str, stochastic: bool, min_size: int, gen: torch.Generator) -> None:
    """Round every eligible parameter's m through the 8-bit format, in place."""
    for group in opt._flat:
        for i, layout in enumerate(group.layouts):
            if layout.rule == ADAM or layout.numel < min_size:
                continue
            m = group.m_view(i).view(layout.num_blocks, -1)
            random = torch.rand(m.shape, generator=gen) if stochastic else None
            codes, scales = quantize(m, code_map, random=random)
            m.copy_(dequantize(codes, scales, code_map))


def run(name: str, fmt, cfg: demo.RunConfig, train_data, val_set, min_size: int) -> dict:
    torch.manual_seed(demo.SEED)
    model = TinyGPT(cfg.model)
    opt = demo.make_optimizer("AdamMini", model, cfg, backend="torch")
    batches = torch.Generator().manual_seed(demo.SEED)
    rounding = torch.Generator().manual_seed(7)
    evals = []
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = demo.lr_at(step - 1, cfg)
        x, y = demo.get_batch(train_data, cfg, batches, "cpu")
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if fmt is not None:
            requantize_m(opt, *fmt, min_size, rounding)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, "val": demo.evaluate(model, val_set)})
    eligible = (l for g in opt._flat for l in g.layouts if l.rule != ADAM and l.numel >= min_size)
    quantized = 0 if fmt is None else sum(l.numel for l in eligible)
    total = sum(p.numel() for p in model.parameters())
    print(f"{name:>18}: final val loss {evals[-1]['val']:.4f}", flush=True)
    return {"evals": evals, "final_val": evals[-1]["val"], "quantized_fraction": quantized / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-size", type=nonnegative_int, default=4096, help="smaller parameters keep float32 m")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    cfg = demo.PRESETS["quick" if args.quick else "cpu"]
    data = demo.load_corpus()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    gen = torch.Generator().manual_seed(demo.SEED + 1)
    val_set = [demo.get_batch(val_data, cfg, gen, "cpu") for _ in range(cfg.val_batches)]
    results = {name: run(name, fmt, cfg, train_data, val_set, args.min_size) for name, fmt in FORMATS.items()}
    ref = results["float32"]["final_val"]
    for r in results.values():
        r["relative_to_float32"] = (r["final_val"] - ref) / ref

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")  # the UTC date, as bench_step.py's files
    stem = args.out / f"int8_m_study_cpu_{date}{'_quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date, "torch": torch.__version__, "steps": cfg.steps, "model": vars(cfg.model),
            "min_size": args.min_size, "qblock": 256}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# 8-bit m formats: tiny GPT, {cfg.steps} steps, CPU, {date}", "",
             "| format | final val loss | vs float32 m | share of params with 8-bit m |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_val']:.4f} | {100 * r['relative_to_float32']:+.2f} % | "
                     f"{100 * r['quantized_fraction']:.1f} % |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.plot([e["step"] for e in r["evals"]], [e["val"] for e in r["evals"]], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("AdamMini with 8-bit m formats (tiny GPT, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
