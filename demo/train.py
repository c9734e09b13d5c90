"""Train a tiny byte-level GPT twice, with AdamMini and with AdamW, and compare.

The corpus is the Python standard library's own ``.py`` sources, so the demo
needs no downloads. Both runs start from the same initial weights and see the
same batches. Run from the repository root::

    python -m demo.train            # full comparison (~1.5 min on a 2-core CPU)
    python -m demo.train --quick    # smoke test
"""

import argparse
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

from adam_mini_kernels import AdamMini
from demo.tiny_gpt import GPTConfig, TinyGPT

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SEED = 1234
CORPUS_BYTES = 4 * 2**20
# Skip installed packages, test suites and the generated codec tables in encodings/.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings"}
NO_DECAY = ("norm", "ln", "bias")


@dataclass
class RunConfig:
    """Everything that defines one training run apart from the optimizer."""

    model: GPTConfig
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    warmup_frac: float = 0.2
    eval_every: int = 25
    val_batches: int = 8


PRESETS = {
    "quick": RunConfig(GPTConfig(block_size=64, n_layer=2, n_head=2, dim=64),
                       steps=20, batch_size=8, eval_every=5, val_batches=2),
    "cpu": RunConfig(GPTConfig()),
    "cuda": RunConfig(GPTConfig(block_size=256, n_layer=6, n_head=8, dim=256),
                      steps=1000, batch_size=32, lr=1e-3, eval_every=50, val_batches=20),
}


def load_corpus(max_bytes: int = CORPUS_BYTES) -> torch.Tensor:
    """Concatenate the stdlib's .py files (sorted, deterministic) into a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    chunks, total = [], 0
    for path in files:
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def get_batch(data: torch.Tensor, cfg: RunConfig, gen: torch.Generator, device: str):
    """Sample random (input, next-byte target) windows of length block_size."""
    t = cfg.model.block_size
    starts = torch.randint(len(data) - t - 1, (cfg.batch_size,), generator=gen).tolist()
    x = torch.stack([data[s:s + t] for s in starts]).long()
    y = torch.stack([data[s + 1:s + t + 1] for s in starts]).long()
    return x.to(device), y.to(device)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def make_optimizer(name: str, model: TinyGPT, cfg: RunConfig, backend: str):
    """Build AdamMini or AdamW with identical hyperparameters."""
    hp = dict(lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if name == "AdamMini":
        return AdamMini(model.named_parameters(), **hp, dim=cfg.model.dim,
                        n_heads=cfg.model.n_head, verbose=False, backend=backend)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if any(k in n for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **hp)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Total bytes of all tensors held in the optimizer state."""
    return sum(v.numel() * v.element_size()
               for s in opt.state_dict()["state"].values()
               for v in s.values() if torch.is_tensor(v))


@torch.no_grad()
def evaluate(model: TinyGPT, val_set) -> float:
    """Mean loss over the fixed validation batches."""
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in val_set) / len(val_set)
    model.train()
    return loss


def train(name: str, train_data, val_set, cfg: RunConfig, device: str, backend: str) -> dict:
    """Train one model from SEED with the named optimizer; return its curves and stats."""
    torch.manual_seed(SEED)
    model = TinyGPT(cfg.model).to(device)
    opt = make_optimizer(name, model, cfg, backend)
    gen = torch.Generator().manual_seed(SEED)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    train_loss, evals, window, step_times = [], [], [], []
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{name:>8}", ncols=90)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        x, y = get_batch(train_data, cfg, gen, device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        step_times.append(time.perf_counter() - t0)
        train_loss.append(loss.item())
        window.append(train_loss[-1])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, "train": sum(window) / len(window),
                          "val": evaluate(model, val_set)})
            window = []
            bar.set_postfix(train=f"{evals[-1]['train']:.3f}", val=f"{evals[-1]['val']:.3f}")
    timed = step_times[5:] or step_times
    n_params = sum(p.numel() for p in model.parameters())
    return {"train_loss": train_loss, "evals": evals,
            "state_bytes_per_param": state_bytes(opt) / n_params,
            "step_ms": 1000 * sum(timed) / len(timed)}


def print_tables(results: dict, cfg: RunConfig) -> None:
    """Print the per-eval loss table and the per-optimizer summary."""
    names = list(results)
    print(f"\ntrain = mean training-batch loss since the previous row; "
          f"val = mean over {cfg.val_batches} fixed held-out batches")
    cols = ("train", "val")
    header = "step" + "".join(f" | {n + ' ' + k:>15}" for n in names for k in cols)
    print(header + "\n" + "-" * len(header))
    for rows in zip(*(results[n]["evals"] for n in names)):
        print(f"{rows[0]['step']:>4}" + "".join(f" | {r[k]:>15.4f}" for r in rows for k in cols))
    header = (f"{'optimizer':>10} | {'final val loss':>14} | "
              f"{'state bytes/param':>17} | {'step ms':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for n, r in results.items():
        print(f"{n:>10} | {r['evals'][-1]['val']:>14.4f} | "
              f"{r['state_bytes_per_param']:>17.2f} | {r['step_ms']:>8.2f}")


def plot(results: dict, path: Path) -> None:
    """Save train (per step) and val (per eval) loss curves of both runs as a PNG."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, r), color in zip(results.items(), ("tab:red", "tab:blue")):
        ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], color=color,
                alpha=0.3, lw=1, label=f"{name} train")
        ax.plot([e["step"] for e in r["evals"]], [e["val"] for e in r["evals"]],
                color=color, marker="o", ms=3, lw=2, label=f"{name} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)",
           title="Tiny GPT on Python stdlib sources: AdamMini vs AdamW")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps per optimizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("demo/out"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny ~20-step run for tests")
    parser.add_argument("--backend", default="auto", help="AdamMini backend")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"argument --steps: must be a positive integer, got {args.steps}")

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_float32_matmul_precision("high")
    cfg = PRESETS["quick" if args.quick else "cuda" if args.device.startswith("cuda") else "cpu"]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)

    data = load_corpus()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_gen = torch.Generator().manual_seed(SEED + 1)
    val_set = [get_batch(val_data, cfg, val_gen, args.device) for _ in range(cfg.val_batches)]
    print(f"corpus: {len(data) / 2**20:.2f} MiB of stdlib source | device: {args.device} | "
          f"model: {asdict(cfg.model)} | steps: {cfg.steps}")

    results = {name: train(name, train_data, val_set, cfg, args.device, args.backend)
               for name in ("AdamMini", "AdamW")}
    print_tables(results, cfg)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "loss_curves.png"
    plot(results, png)
    (args.out / "loss_curves.json").write_text(json.dumps(
        {"config": asdict(cfg), "device": args.device, "results": results}, indent=1))
    print(f"\nloss curves: {png}")


if __name__ == "__main__":
    main()
