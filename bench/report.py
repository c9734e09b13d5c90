"""Markdown table and PNG plot of a results dict written by ``bench_step.py``.

Both are derived from the JSON alone, so they can be regenerated from a results file:
``python bench/report.py bench/results/<file>.json`` rewrites the .md and .png beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_gbps(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_cells(row: Dict) -> List[str]:
    status = row["status"]
    note = row.get("reason") or ""
    if row.get("note"):
        note = (note + "; " if note else "") + row["note"]
    if row.get("compile_s") is not None:
        note = (note + "; " if note else "") + f"compile + first steps {row['compile_s']:.1f} s"
    if row.get("unique_graphs") is not None:  # a compiled row: in capitals where it did not time one graph
        graphs, breaks = row["unique_graphs"], row["graph_breaks"]
        text = f"{graphs} compiled graph{'s' * (graphs != 1)}, {breaks} graph break{'s' * (breaks != 1)}"
        note = (note + "; " if note else "") + (text.upper() if breaks or graphs != 1 else text)
    if row.get("finite") is False:
        note = (note + "; " if note else "") + "NON-FINITE parameters after timing"
    if row.get("meets_target") is not None:
        verdict = "meets target" if row["meets_target"] else "MISSES target"
        if row.get("target_basis", "").startswith("H100 target x"):
            verdict += f" ({_fmt_ms(row['target_ms'])} ms: the H100 target scaled by the copy bandwidths)"
        note = (note + "; " if note else "") + verdict
    host = row.get("host_ms")
    if status == "ok" and host is not None and host >= 0.9 * row["median_ms"]:
        note = (note + "; " if note else "") + "host-bound (host ms >= 90% of the median)"
    if status != "ok":
        return [row["label"], status, "-", "-", "-", "-", "-", "-", "-", "-", _fmt_ms(row.get("spec_reference_ms")), _one_line(note)]
    extra = row.get("extra_peak_bytes")
    extra_txt = "n/a" if extra is None else f"{_fmt_bytes(extra)} ({100 * row['extra_peak_fraction_of_params']:.2g}%)"
    return [
        row["label"],
        "ok",
        _fmt_ms(row["median_ms"]),
        f"{_fmt_ms(row['p20_ms'])}–{_fmt_ms(row['p80_ms'])}",
        "n/a" if host is None else _fmt_ms(host),
        f"{row['min_bytes_per_param']:.2f}",
        _fmt_gbps(row["achieved_gbps"]),
        f"{100 * row['fraction_of_floor']:.1f}%",
        f"{row['state_bytes_per_param']:.2f}",
        extra_txt,
        _fmt_ms(row.get("spec_reference_ms")),
        _one_line(note),
    ]


HEADER = [
    "optimizer",
    "status",
    "median ms",
    "p20–p80 ms",
    "host ms",
    "min B/param",
    "GB/s",
    "of floor",
    "state B/param",
    "extra peak in step()",
    "SPEC H100 ms",
    "notes",
]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


CLIP_RATIO_TARGET = 1.25  # issue 6: the clipped step <= 1.25x the unclipped step of the same run
CLIP_SPEEDUP_TARGET = 1.25  # issue 6: clip_grad_norm_ (foreach) + step >= 1.25x our clipped step


def clipping_ratios(rows: List[Dict]) -> List[Dict]:
    """Per backend of one set's rows, where both its plain row (``ours-<backend>``) and its clipped
    row (``ours-<backend>-clip``) were timed: the clipped/unclipped ratio, and where the
    ``clip_grad_norm_`` + step row (``ours-<backend>-clip-then-step``) was timed too, its time over
    the clipped step's."""
    ok = {r["optimizer"]: r for r in rows if r.get("status") == "ok"}
    out = []
    for r in rows:
        if r.get("status") != "ok" or not r["optimizer"].endswith("-clip"):
            continue
        base = ok.get(r["optimizer"][: -len("-clip")])
        if base is None:
            continue
        then = ok.get(r["optimizer"] + "-then-step")
        out.append(dict(
            backend=r.get("backend"), unclipped_ms=base["median_ms"], clipped_ms=r["median_ms"],
            ratio=r["median_ms"] / base["median_ms"],
            clip_then_step_ms=None if then is None else then["median_ms"],
            speedup=None if then is None else then["median_ms"] / r["median_ms"],
        ))
    return out


def _clipping_lines(rows: List[Dict]) -> List[str]:
    ratios = clipping_ratios(rows)
    if not ratios:
        return []
    body = []
    for c in ratios:
        body.append([
            str(c["backend"]), _fmt_ms(c["unclipped_ms"]), _fmt_ms(c["clipped_ms"]),
            f"{c['ratio']:.3f}x" + ("" if c["ratio"] <= CLIP_RATIO_TARGET else " (over 1.25x)"),
            _fmt_ms(c["clip_then_step_ms"]),
            "-" if c["speedup"] is None else f"{c['speedup']:.3f}x" + ("" if c["speedup"] >= CLIP_SPEEDUP_TARGET else " (under 1.25x)"),
        ])
    return ["", f"Fused clipping (issue 6: clipped/unclipped <= {CLIP_RATIO_TARGET}x, "
            f"clip_grad_norm_ + step over clipped >= {CLIP_SPEEDUP_TARGET}x), medians of this run:", ""] + _table(
        ["backend", "unclipped ms", "clipped ms", "clipped/unclipped", "clip_grad_norm_ + step ms", "its time / clipped"], body)


def markdown(res: Dict) -> str:
    dev, ver = res["device"], res["versions"]
    copy = res["copy_bandwidth"]
    lines = [
        f"# Optimizer step benchmark: {dev['name']}, {res['date']}",
        "",
        f"- device: {dev['name']}" + (f" ({dev['sm_count']} SMs, {_fmt_bytes(dev['total_memory_bytes'])})" if dev.get("sm_count") else ""),
        f"- torch {ver['torch']} (CUDA {ver['cuda']}), triton {ver['triton']}, python {ver['python']}, "
        f"adam-mini-kernels {ver['adam_mini_kernels']}, official adam-mini {ver['adam_mini_official']}",
        f"- commit: {res['git']['commit']}" + (" (uncommitted changes)" if res["git"].get("dirty") else ""),
        f"- copy bandwidth (device-to-device copy of {_fmt_bytes(copy['buffer_bytes'])}, read + written): "
        f"**{copy['gbps']:.0f} GB/s** at start, {copy['gbps_end']:.0f} GB/s at end"
        if copy.get("gbps_end") is not None
        else f"- copy bandwidth: **{copy['gbps']:.0f} GB/s**",
        f"- timing: {res['timing']['method']}; median of `opt.step()` with 20th/80th percentiles, after warm-up "
        f"({res['timing']['warmup_steps']} steps + {res['timing']['warmup_ms']} ms)",
        "- `of floor`: (minimum bytes / copy bandwidth) / median. `min B/param`: Adam-mini reads p, g, m and writes "
        "p, m (5 x storage bytes) plus v traffic; AdamW reads p, g, m, v and writes p, m, v (7 x storage bytes). "
        "`extra peak`: `torch.cuda.max_memory_allocated` during one step beyond what was allocated before it "
        "(params, grads, state), with its fraction of the parameter bytes. `host ms`: median host time of one "
        "`step()` call without a sync (GPU rows; the step is host-bound where it nears the median). "
        "`SPEC H100 ms`: SPEC section 5's "
        "anchors (AdamW, official) and targets (fused backends), measured on another day: compare with care.",
    ]
    if not res.get("complete", True):
        lines.append("- **incomplete run**: the script stopped before the end; rows missing from it were not run.")
    if res.get("smoke"):
        lines.append("- **smoke run**: tiny shapes on the CPU; the numbers only show that the harness works.")
    for s in res["sets"]:
        if s["key"].startswith("sweep-"):
            continue
        lines += [
            "",
            f"## {s['key']}: {s['title']}",
            "",
            f"{s['n_params']:,} parameters in {s['n_tensors']} tensors ({s['dtype']}). {s['description']}. "
            f"Adam-mini floor {_fmt_ms(s['adam_mini_floor_ms'])} ms ({s['adam_mini_min_bytes_per_param']:.2f} B/param), "
            f"AdamW floor {_fmt_ms(s['adamw_floor_ms'])} ms, at the measured copy bandwidth.",
            "",
        ]
        rows = [r for r in res["rows"] if r["set"] == s["key"]]
        lines += _table(HEADER, [_row_cells(r) for r in rows])
        lines += _clipping_lines(rows)
    sweep = [s for s in res["sets"] if s["key"].startswith("sweep-")]
    if sweep:
        labels: List[str] = []
        for r in res["rows"]:
            if r["set"].startswith("sweep-") and r["label"] not in labels:
                labels.append(r["label"])
        body = []
        for s in sweep:
            cells = [s["key"], f"{s['n_params']:,}", _fmt_ms(s["adam_mini_floor_ms"])]
            for label in labels:
                row = next((r for r in res["rows"] if r["set"] == s["key"] and r["label"] == label), None)
                if row is None:
                    cells.append("-")
                elif row["status"] == "ok":
                    cells.append(_fmt_ms(row["median_ms"]))
                else:
                    cells.append(row["status"])
            body.append(cells)
        lines += ["", "## Size sweep (Llama shapes, fp32): median step ms", ""]
        lines += _table(["set", "params", "Adam-mini floor"] + labels, body)
        reasons = {
            r["label"]: r["reason"] for r in res["rows"] if r["set"].startswith("sweep-") and r["status"] != "ok" and r.get("reason")
        }
        if reasons:
            lines += [""] + [f"- {label}: {_one_line(reason, 300)}" for label, reason in reasons.items()]
    return "\n".join(lines) + "\n"


def plot(res: Dict, path: Path) -> None:
    """Step time against parameter count, log-log, one line per optimizer over the sweep (the
    named sets as points when no sweep ran), with the bandwidth floors drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {s["key"]: s for s in res["sets"]}
    sweep_keys = [k for k in sets if k.startswith("sweep-")]
    use = sweep_keys or [k for k in sets if sets[k]["dtype"] == "float32"] or list(sets)
    fig, ax = plt.subplots(figsize=(9, 6))
    labels: List[str] = []
    for r in res["rows"]:
        if r["set"] in use and r["label"] not in labels:
            labels.append(r["label"])
    markers = "osD^v<>ph*"
    for i, label in enumerate(labels):
        pts = sorted(
            (sets[r["set"]]["n_params"], r["median_ms"])
            for r in res["rows"]
            if r["set"] in use and r["label"] == label and r["status"] == "ok"
        )
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if sweep_keys else "none", label=label)
    for label in labels:  # optimizers that could not run still get a legend entry saying so
        if not any(r["label"] == label and r["status"] == "ok" and r["set"] in use for r in res["rows"]):
            found = {r["status"] for r in res["rows"] if r["label"] == label and r["set"] in use}
            status = next(st for st in ("error", "oom", "unavailable", "skipped") if st in found)
            ax.plot([], [], linestyle="none", marker="x", color="grey", label=f"{label}: {status}, no data")
    ns = sorted({sets[k]["n_params"] for k in use})
    gbps = res["copy_bandwidth"]["gbps"]
    if ns and gbps:
        lo, hi = ns[0], ns[-1]
        mini = [sets[k] for k in use]
        per_param = max(s["adam_mini_min_bytes_per_param"] for s in mini)
        adamw_pp = max(s["adamw_min_bytes_per_param"] for s in mini)
        xs = [lo, hi]
        ax.plot(xs, [n * per_param / (gbps * 1e9) * 1e3 for n in xs], "k-", linewidth=2,
                label=f"Adam-mini floor ({per_param:.0f} B/param at {gbps:.0f} GB/s)")
        ax.plot(xs, [n * adamw_pp / (gbps * 1e9) * 1e3 for n in xs], "k:", linewidth=1.5,
                label=f"AdamW floor ({adamw_pp:.0f} B/param)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("opt.step() median time (ms)")
    kind = "Llama-shape sweep, fp32" if sweep_keys else "parameter sets"
    smoke = " [smoke run, CPU, tiny shapes]" if res.get("smoke") else ""
    ax.set_title(f"{kind}: {res['device']['name']}, {res['date']}{smoke}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(res: Dict, json_path: Path) -> str:
    """Write the .md and .png beside ``json_path``; return the markdown."""
    md = markdown(res)
    json_path.with_suffix(".md").write_text(md, encoding="utf-8")
    plot(res, json_path.with_suffix(".png"))
    return md


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py RESULTS.json  (rewrites RESULTS.md and RESULTS.png)")
    p = Path(sys.argv[1])
    print(write(json.loads(p.read_text(encoding="utf-8")), p))
