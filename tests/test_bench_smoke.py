"""The step benchmark harness (bench/bench_step.py) in its CPU smoke mode, so that it cannot rot.

It runs the script as a user would (a subprocess with this interpreter) on tiny shapes and checks
what it wrote: the JSON's fields, a row for every requested optimizer (those that cannot run here
with a reason, never dropped), positive timings and sane byte counts for those that ran, and the
markdown table and PNG plot beside the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_step.py"
ALL_OPTIMIZERS = ["adamw-foreach", "adamw-fused", "official", "ours-torch", "ours-torch-compile", "ours-triton", "ours-cuda"]
STATUSES = {"ok", "unavailable", "skipped", "error", "oom"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU check; on a GPU run the full harness")


def _run(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"bench_step.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    path = files[0]
    assert "_smoke" in path.name
    for suffix in (".md", ".png"):
        assert path.with_suffix(suffix).is_file(), suffix
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = path.with_suffix(".md").read_text(encoding="utf-8")
    assert md.strip() in proc.stdout  # the table is printed too
    return json.loads(path.read_text(encoding="utf-8")), md, proc


def _official_importable() -> bool:
    try:
        import adam_mini  # noqa: F401
    except ImportError:
        return False
    return True


def _check_ok_row(row: dict, set_rec: dict) -> None:
    assert row["median_ms"] > 0 and row["p20_ms"] > 0 and row["p80_ms"] > 0, row
    assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert row["finite"] is True, row
    assert row["min_bytes"] > 0 and row["floor_ms"] > 0 and row["state_bytes"] > 0, row
    # GB/s and the fraction of the floor follow from the median: min bytes / median, floor / median.
    assert row["achieved_gbps"] == pytest.approx(row["min_bytes"] / (row["median_ms"] * 1e-3) / 1e9, rel=1e-12), row
    assert row["fraction_of_floor"] == pytest.approx(row["floor_ms"] / row["median_ms"], rel=1e-12), row
    s = set_rec["storage_bytes"]
    if row["family"] == "adamw":
        assert row["min_bytes_per_param"] == pytest.approx(7 * s)
        assert row["state_bytes_per_param"] == pytest.approx(2 * s, rel=0.01)
    else:
        assert 5 * s < row["min_bytes_per_param"] < 5 * s + 1, row  # plus a little v traffic
        assert s <= row["state_bytes_per_param"] < s + 1, row  # m, plus few v values
    assert row["extra_peak_bytes"] is None  # CPU: n/a
    assert row["host_ms"] is None  # CPU: the host time is the step time


def test_smoke_run_writes_every_row(tmp_path):
    res, md, proc = _run(tmp_path)
    assert res["smoke"] is True
    for key in ("schema_version", "date", "timestamp", "device", "versions", "git", "timing", "copy_bandwidth", "sets", "rows", "spec_reference"):
        assert key in res, key
    assert res["device"]["name"]
    for key in ("torch", "triton", "cuda", "python", "adam_mini_kernels", "adam_mini_official"):
        assert key in res["versions"], key
    assert "commit" in res["git"]
    assert res["copy_bandwidth"]["gbps"] > 0
    assert res["copy_bandwidth"]["median_ms"] > 0

    sets = {s["key"]: s for s in res["sets"]}
    named = ["llama-1.1b-fp32", "gpt2-124m-fp32", "llama-1.1b-bf16"]
    sweep = [k for k in sets if k.startswith("sweep-")]
    assert set(named) <= set(sets) and len(sweep) >= 2
    assert sets["llama-1.1b-bf16"]["storage_bytes"] == 2
    assert sets["gpt2-124m-fp32"]["n_params"] > 0

    for key in named + sweep:
        rows = {r["optimizer"]: r for r in res["rows"] if r["set"] == key}
        assert sorted(rows) == sorted(ALL_OPTIMIZERS), (key, sorted(rows))
        for opt_id, row in rows.items():
            assert row["status"] in STATUSES, row
            if row["status"] == "ok":
                _check_ok_row(row, sets[key])
            else:
                assert isinstance(row["reason"], str) and row["reason"], row
        for opt_id in ("adamw-foreach", "adamw-fused", "ours-torch"):
            assert rows[opt_id]["status"] == "ok", rows[opt_id]
        assert rows["official"]["status"] == ("ok" if _official_importable() else "unavailable")
        # No GPU here: the fused backends are reported with the reason, the interpreter not timed.
        for opt_id in ("ours-triton", "ours-cuda"):
            assert rows[opt_id]["status"] == "unavailable" and "CUDA" in rows[opt_id]["reason"], rows[opt_id]
        assert rows["ours-torch-compile"]["status"] == "skipped"
        assert "skipped-in-smoke" in rows["ours-torch-compile"]["reason"]

    for label in {r["label"] for r in res["rows"]}:
        assert label in md
    for key in named:
        assert f"## {key}" in md


def test_smoke_flags_pick_sets_backends_and_optimizers(tmp_path):
    res, md, _ = _run(
        tmp_path, "--sets", "gpt2-124m-fp32", "--no-sweep", "--backends", "torch,nosuch",
        "--optimizers", "ours,adamw-fused", "--tag", "flags", "--commit", "0123abc",
    )
    assert [s["key"] for s in res["sets"]] == ["gpt2-124m-fp32"]
    rows = {r["optimizer"]: r for r in res["rows"]}
    assert sorted(rows) == ["adamw-fused", "ours-nosuch", "ours-torch"]
    assert rows["ours-torch"]["status"] == "ok" and rows["adamw-fused"]["status"] == "ok"
    assert rows["ours-nosuch"]["status"] == "unavailable" and "nosuch" in rows["ours-nosuch"]["reason"]
    assert res["git"]["commit"] == "0123abc"
    assert next(tmp_path.glob("*.json")).name.endswith("_smoke_flags.json")


def test_smoke_variants_rows(tmp_path):
    """The issue-6 and issue-10 rows (float32 state, stochastic rounding, fused clipping,
    clip_grad_norm_ + step, int8 state): timed where they apply, skipped with the reason where
    not, with their byte floors."""
    res, md, _ = _run(tmp_path, "--no-sweep", "--backends", "torch", "--optimizers", "ours,variants")
    rows = {(r["set"], r["optimizer"]): r for r in res["rows"]}
    # The clipped step beside the unclipped one of the same run (issue 6: <= 1.25x): the report
    # gives the ratio per set and backend.
    sys.path.insert(0, str(REPO / "bench"))
    import report

    for key in ("llama-1.1b-fp32", "llama-1.1b-bf16", "gpt2-124m-fp32"):
        plain, clip = rows[(key, "ours-torch")], rows[(key, "ours-torch-clip")]
        assert plain["status"] == clip["status"] == "ok", (plain, clip)
        (ratio,) = report.clipping_ratios([r for r in res["rows"] if r["set"] == key])
        assert ratio["backend"] == "torch"
        assert ratio["ratio"] == pytest.approx(clip["median_ms"] / plain["median_ms"], rel=1e-12)
        then = rows[(key, "ours-torch-clip-then-step")]
        assert ratio["speedup"] == pytest.approx(then["median_ms"] / clip["median_ms"], rel=1e-12)
    assert md.count("| backend | unclipped ms | clipped ms | clipped/unclipped |") == 3, md
    for variant in ("fp32-state", "stochastic-rounding", "clip", "clip-then-step", "int8-state"):
        bf16 = rows[("llama-1.1b-bf16", f"ours-torch-{variant}")]
        assert bf16["status"] == "ok", bf16
    for dtype, floor in (("bf16", 8), ("fp32", 14)):  # issue 10: 8 and 14 B/param, + scales
        row = rows[(f"llama-1.1b-{dtype}", "ours-torch-int8-state")]
        assert row["status"] == "ok" and row["min_bytes_per_param"] == pytest.approx(floor, abs=0.2), row
    # The smoke shapes are small, so part of them keeps m in float (under 4096 elements).
    assert rows[("llama-1.1b-fp32", "ours-torch-int8-state")]["state_bytes_per_param"] < 3
    assert rows[("llama-1.1b-bf16", "ours-torch-fp32-state")]["min_bytes_per_param"] == pytest.approx(14, abs=0.2)
    assert rows[("llama-1.1b-bf16", "ours-torch-stochastic-rounding")]["min_bytes_per_param"] == pytest.approx(10, abs=0.2)
    assert rows[("llama-1.1b-bf16", "ours-torch-clip")]["min_bytes_per_param"] == pytest.approx(12, abs=0.2)
    for variant, why in (("fp32-state", "float32 state"), ("stochastic-rounding", "bfloat16")):
        row = rows[("llama-1.1b-fp32", f"ours-torch-{variant}")]
        assert row["status"] == "skipped" and why in row["reason"], row


def test_clipping_ratio_needs_both_rows():
    """No ratio for a backend without its plain row, or with either row not timed."""
    sys.path.insert(0, str(REPO / "bench"))
    import report

    def row(opt, ms, status="ok"):
        return dict(optimizer=opt, backend=opt.split("-")[1], status=status, median_ms=ms)

    rows = [row("ours-triton", 2.0), row("ours-triton-clip", 2.4), row("ours-cuda-clip", 2.2),
            row("ours-torch", 5.0), row("ours-torch-clip", 0.0, "error"), row("ours-triton-clip-then-step", 3.6)]
    (only,) = report.clipping_ratios(rows)
    assert only["backend"] == "triton" and only["ratio"] == pytest.approx(1.2) and only["speedup"] == pytest.approx(1.5)
    assert report.clipping_ratios([row("ours-cuda", 1.0), row("ours-cuda-clip", 1.3)])[0]["speedup"] is None


def test_smoke_compiled_row_records_its_graphs(tmp_path):
    """The torch.compile row runs in smoke mode when asked for by name, and records the graph
    breaks and compiled graphs of its compile, warm-up and timing (a graph break or a recompile
    would time something else than one compiled step); the table gives them."""
    res, md, _ = _run(tmp_path, "--no-sweep", "--sets", "gpt2-124m-fp32", "--backends", "torch", "--optimizers", "compile")
    (row,) = res["rows"]
    assert row["optimizer"] == "ours-torch-compile" and row["status"] == "ok", row
    assert type(row["graph_breaks"]) is int and type(row["unique_graphs"]) is int, row
    assert row["graph_breaks"] == 0 and row["unique_graphs"] == 1, row  # one compiled step was timed
    assert "1 compiled graph, 0 graph breaks" in md, md


def test_report_flags_graph_breaks_and_recompiles():
    """A compiled row's notes give its compiled graphs and graph breaks, in capitals where it did
    not time one graph; rows that were not compiled say nothing of graphs."""
    sys.path.insert(0, str(REPO / "bench"))
    import report

    row = dict(label="torch.compile(AdamMini [torch].step)", status="ok", median_ms=5.0, p20_ms=4.9, p80_ms=5.1,
               min_bytes_per_param=20.0, achieved_gbps=2700.0, fraction_of_floor=0.9, state_bytes_per_param=4.0,
               extra_peak_bytes=None, host_ms=None, compile_s=40.0)
    for graphs, breaks, note in ((1, 0, "1 compiled graph, 0 graph breaks"), (3, 2, "3 COMPILED GRAPHS, 2 GRAPH BREAKS"),
                                 (2, 0, "2 COMPILED GRAPHS, 0 GRAPH BREAKS")):
        assert note in report._row_cells({**row, "unique_graphs": graphs, "graph_breaks": breaks})[-1]
    assert "graph" not in report._row_cells(row)[-1]


def test_smoke_8bit_adamw_rows_run_or_say_why(tmp_path):
    """The 8-bit AdamW anchors of issue 10 (torchao, bitsandbytes): timed where they import and
    run, otherwise reported with the reason, never dropped."""
    res, _, _ = _run(tmp_path, "--no-sweep", "--sets", "llama-1.1b-fp32", "--optimizers", "adamw8bit")
    rows = {r["optimizer"]: r for r in res["rows"]}
    assert sorted(rows) == ["adamw8bit-bnb", "adamw8bit-torchao"]
    for key, module in (("adamw8bit-torchao", "torchao"), ("adamw8bit-bnb", "bitsandbytes")):
        row = rows[key]
        if importlib.util.find_spec(module) is not None:  # installed: it must run (both do on a CPU)
            assert row["status"] == "ok", row
            # fp32: read p, g, m, v codes, write p and the codes, + scales
            assert row["min_bytes_per_param"] == pytest.approx(16.06, abs=0.05), row
        else:
            assert row["status"] == "unavailable" and "does not import" in row["reason"], row


def test_smoke_graph_rows_say_why_they_cannot_run(tmp_path):
    """The issue-7 rows (CUDA graph replay of ours and of torch fused AdamW) exist in the results;
    on a CPU they are reported unavailable, with the reason, never dropped."""
    res, _, _ = _run(tmp_path, "--no-sweep", "--sets", "gpt2-124m-fp32", "--backends", "torch", "--optimizers", "graphs")
    rows = {r["optimizer"]: r for r in res["rows"]}
    assert sorted(rows) == ["adamw-fused-graph", "ours-torch-graph"]
    for row in rows.values():
        assert row["status"] == "unavailable" and "CUDA graph" in row["reason"], row


def test_targets_belong_to_the_rows_they_were_set_for():
    """The plain fused step has SPEC section 5's target, int8 m issue 10's, float32 state with
    bf16 params issue 6's; anchors, compiled and
    graph rows and the other variants (which move other bytes) have none. (In a subprocess:
    importing bench_step switches Triton's interpreter off.)"""
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import bench_step as b; S = b.OptSpec\n"
        "rows = [S('ours-triton', '', 'adam-mini', backend='triton'), S('ours-cuda-int8', '', 'adam-mini', backend='cuda', variant='int8-state'),\n"
        "        S('ours-cuda-clip', '', 'adam-mini', backend='cuda', variant='clip'), S('ours-torch', '', 'adam-mini', backend='torch'),\n"
        "        S('ours-triton-graph', '', 'adam-mini', backend='triton', graph=True), S('adamw-fused', '', 'adamw'),\n"
        "        S('ours-triton-fp32', '', 'adam-mini', backend='triton', variant='fp32-state')]\n"
        "print(json.dumps({k: [b.h100_target_ms(s, k) for s in rows] for k in ('llama-1.1b-fp32', 'llama-1.1b-bf16', 'gpt2-124m-fp32')}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "llama-1.1b-fp32": [7.6, 5.4, None, None, None, None, None],
        "llama-1.1b-bf16": [3.85, 3.1, None, None, None, None, 5.4],  # issue 6: float32 state <= 5.4 ms
        "gpt2-124m-fp32": [0.90, None, None, None, None, None, None],
    }


def test_targets_apply_as_measured_only_on_the_target_device():
    """The targets were measured on an H100 SXM (80GB HBM3): only that device is judged against
    them as they are; a PCIe or NVL H100 (other HBM bandwidths) and an H200 get them scaled by
    the copy bandwidths. (In a subprocess: importing bench_step switches Triton's interpreter off.)"""
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "cpu-x86-64"]
    code = f"import json, sys; sys.path.insert(0, 'bench'); import bench_step as b; print(json.dumps([b.is_target_device(n) for n in {names!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, False, False, False, False]


def test_report_marks_host_bound_rows():
    """A GPU row whose host time per step() call nears its median is marked host-bound in the
    table (its timing then measures the Python front-end and the launches, not the kernels)."""
    sys.path.insert(0, str(REPO / "bench"))
    import report

    row = dict(label="ours-triton", status="ok", median_ms=0.9, p20_ms=0.89, p80_ms=0.92, min_bytes_per_param=20.0,
               achieved_gbps=2700.0, fraction_of_floor=0.93, state_bytes_per_param=4.0, extra_peak_bytes=0,
               extra_peak_fraction_of_params=0.0)
    for host, bound in ((None, False), (0.3, False), (0.85, True)):
        cells = report._row_cells({**row, "host_ms": host})
        assert cells[report.HEADER.index("host ms")] == ("n/a" if host is None else report._fmt_ms(host))
        assert ("host-bound" in cells[-1]) == bound, cells
    failed = report._row_cells(dict(label="ours-cuda", status="error", reason="boom", host_ms=None))
    assert len(failed) == len(report.HEADER)


def test_smoke_sets_take_sweep_keys(tmp_path):
    """--sets names a sweep size too (the graph rows of issue 7 at 1M and 10M without timing the
    whole sweep): it runs as a sweep row, once, beside the named sets."""
    res, _, _ = _run(tmp_path, "--no-sweep", "--sets", "sweep-llama-19.6k,gpt2-124m-fp32,sweep-llama-19.6k",
                     "--backends", "torch", "--optimizers", "ours,adamw-fused")
    assert sorted(s["key"] for s in res["sets"]) == ["gpt2-124m-fp32", "sweep-llama-19.6k"]
    rows = [(r["set"], r["optimizer"], r["status"]) for r in res["rows"]]
    assert sorted(rows) == [("gpt2-124m-fp32", "adamw-fused", "ok"), ("gpt2-124m-fp32", "ours-torch", "ok"),
                            ("sweep-llama-19.6k", "adamw-fused", "ok"), ("sweep-llama-19.6k", "ours-torch", "ok")]
    assert res["timing"]["sweep_rep_ms"] == 10.0  # smoke


def _patched_smoke_run(tmp_path, patch: str, returncode: int):
    """bench_step.main in smoke mode on two sets (AdamW fused and ours, torch) in a process where
    ``patch`` (code with ``b`` = the bench_step module) has replaced a function: the exit status
    must be ``returncode``, and the JSON, table and plot written. Returns (JSON path, results)."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import bench_step as b\n" + patch +
        f"sys.exit(b.main(['--smoke', '--out', {str(tmp_path)!r}, '--no-sweep', '--sets', 'gpt2-124m-fp32,llama-1.1b-bf16',\n"
        "                  '--backends', 'torch', '--optimizers', 'adamw-fused,ours', '--no-progress']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == returncode, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [path] = tmp_path.glob("*.json")
    for suffix in (".md", ".png"):
        assert path.with_suffix(suffix).is_file(), suffix
    return path, json.loads(path.read_text(encoding="utf-8"))


def test_failed_cleanup_skips_the_rest_and_still_writes_the_files(tmp_path):
    """After a sticky CUDA error, freeing memory at the end of a row raises too (empty_cache):
    simulated in-process by a release() that raises once, from the first row's clean-up. The
    run must go on: the rows after it are skipped with the reason, and the JSON, table and plot
    are written (before, the exception left main with no .md, no .png, no skipped rows)."""
    path, res = _patched_smoke_run(tmp_path, (
        "real, calls = b.release, []\n"
        "def release(device):\n"
        "    calls.append(device)\n"
        "    if len(calls) == 3:  # 1: copy bandwidth, 2: before the first row, 3: its clean-up\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered (simulated)')\n"
        "    real(device)\n"
        "b.release = release\n"
    ), returncode=0)
    assert res["complete"] is True
    first, *rest = res["rows"]
    assert (first["set"], first["optimizer"], first["status"]) == ("gpt2-124m-fp32", "adamw-fused", "ok")
    assert "illegal memory access" in first["cleanup_error"]
    assert len(rest) == 3
    for row in rest:
        assert row["status"] == "skipped" and "context was lost" in row["reason"], row
        assert "adamw-fused on gpt2-124m-fp32" in row["reason"], row
    assert "gbps_end" not in res["copy_bandwidth"] and "not measured" in res["copy_bandwidth"]["gbps_end_error"]


def test_sigint_reports_the_rest_as_skipped_and_writes_the_files(tmp_path):
    """tests/gpu/device_session.sh stops the benchmark with SIGINT at its deadline: simulated by a
    KeyboardInterrupt from the second row. The rows not run are skipped with the reason, the
    JSON (marked incomplete), the table and the plot are written, and the exit status is 130."""
    path, res = _patched_smoke_run(tmp_path, (
        "real, calls = b.run_row, []\n"
        "def run_row(*args):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(*args)\n"
        "b.run_row = run_row\n"
    ), returncode=130)
    assert res["complete"] is False and "incomplete run" in path.with_suffix(".md").read_text(encoding="utf-8")
    assert [(r["set"], r["optimizer"], r["status"]) for r in res["rows"]] == [
        ("gpt2-124m-fp32", "adamw-fused", "ok"), ("gpt2-124m-fp32", "ours-torch", "skipped"),
        ("llama-1.1b-bf16", "adamw-fused", "skipped"), ("llama-1.1b-bf16", "ours-torch", "skipped")]
    assert all("interrupted (SIGINT)" in r["reason"] for r in res["rows"][1:])
    assert [r["reason"].endswith("while this row ran") for r in res["rows"][1:]] == [True, False, False]  # its time went there
