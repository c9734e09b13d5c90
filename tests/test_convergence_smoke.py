"""bench/convergence.py must keep working: its smoke preset trains every run (int8 m included) for
a few steps and writes the JSON, the markdown table and the PNG, with the issues' criteria
evaluated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_convergence_smoke(tmp_path):
    pytest.importorskip("adam_mini")  # the official run (required in CI: conftest.py)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "bench/convergence.py", "--preset", "smoke", "--backends", "torch", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [json_path] = tmp_path.glob("convergence_*.json")
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    table = json_path.with_suffix(".md").read_text()
    report = json.loads(json_path.read_text())
    assert set(report["git"]) == {"commit", "dirty", "source"}  # the commit the curves come from
    runs = report["results"]
    assert set(runs) == {"official", "official (1 ulp)", "AdamMini[torch]", "AdamMini[int8]", "AdamMini.for_model", "AdamW"}
    for name, run in runs.items():
        assert len(run["train_loss"]) == 6 and all(0 < x < 10 for x in run["train_loss"]), name
        assert name in table
    # Same partition as official, same seed and data: the same curve.
    criteria = report["criteria"]["AdamMini[torch]"]
    assert criteria["curve_steps_compared"] == 6 and criteria["curve_rel_diff_vs_official"] < 1e-3
    assert criteria["curve_equal"] and "final_val_rel_vs_adamw" in criteria
    assert "curve_rel_diff_vs_official" not in report["criteria"]["AdamMini.for_model"]
    # The noise floor: official from one initial weight moved by one ulp, compared with official.
    floor = report["criteria"]["official (1 ulp)"]
    assert floor["curve_steps_compared"] == 6 and 0 <= floor["curve_rel_diff_vs_official"] < 1e-3
    assert "curve_equal" not in floor and "noise floor" in table
    # int8 m: compared with the float32-state run (criterion 3), not with official's curve.
    int8 = report["criteria"]["AdamMini[int8]"]
    assert "curve_rel_diff_vs_official" not in int8 and "final_val_rel_vs_adamw" in int8
    # Six steps are too few for issue 10's 1 %: the flag must say what the value says.
    assert abs(int8["final_val_rel_vs_fp32_state"]) < 0.05
    assert int8["int8_final_within_1pct"] is (abs(int8["final_val_rel_vs_fp32_state"]) < 0.01)
    assert "val vs AdamMini[torch]" in table
    assert "final_val_rel_vs_fp32_state" not in report["criteria"]["AdamMini[torch]"]


def test_time_budget_and_resume(tmp_path):
    """A spent budget starts no run (the file says why); --resume keeps the finished runs of an
    earlier file (none is trained again: the losses and times are the file's) and refuses a file
    of another configuration."""
    pytest.importorskip("adam_mini")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def call(out, *extra):
        command = [sys.executable, "bench/convergence.py", "--preset", "smoke", "--backends", "torch", "--out", str(out), *extra]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    def report(out):
        [path] = Path(out).glob("convergence_*.json")
        return path, json.loads(path.read_text())

    assert call(tmp_path / "none", "--time-budget-s", "0").returncode == 0
    _, none = report(tmp_path / "none")
    assert all("time budget" in r["not_run"] for r in none["results"].values())
    assert call(tmp_path / "full").returncode == 0
    full_path, full = report(tmp_path / "full")
    assert call(tmp_path / "resumed", "--resume", str(full_path)).returncode == 0
    _, resumed = report(tmp_path / "resumed")
    assert resumed["results"] == full["results"]  # kept, seconds included: nothing ran again
    refused = call(tmp_path / "other", "--seed", "7", "--resume", str(full_path))
    assert refused.returncode != 0 and "another seed" in refused.stderr
    refused = call(tmp_path / "other_lr", "--lr", "0", "--resume", str(full_path))  # --lr (0 too) is the config's
    assert refused.returncode != 0 and "another config" in refused.stderr


def _conv(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "bench/convergence.py", "--preset", "smoke", "--out", str(out), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_backends_that_cannot_run_are_rows_saying_why(tmp_path):
    """By default every backend is a run: one that cannot run here (cuda on a CPU) is a not_run
    row with the reason, never silently left out (the table of issue 9 must show it)."""
    proc = _conv(tmp_path, "--time-budget-s", "0")  # nothing trains: the rows alone
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("convergence_*.json")
    results = json.loads(path.read_text())["results"]
    assert {"AdamMini[cuda]", "AdamMini[triton]", "AdamMini[torch]"} <= set(results), sorted(results)
    import torch

    if not torch.cuda.is_available():
        cuda = results["AdamMini[cuda]"]["not_run"]
        assert "'cuda' cannot run on cpu here" in cuda and "CUDA" in cuda, cuda
        assert "AdamMini[cuda] | not run: backend 'cuda' cannot run" in path.with_suffix(".md").read_text()


def test_resume_passes_over_files_of_another_device(tmp_path):
    """--resume with a file of another GPU (the next lease drew an H200, not an H100) warns and
    starts fresh instead of refusing (which would waste the lease); of several files, the one of
    this device is resumed."""
    assert _conv(tmp_path / "here", "--backends", "torch", "--time-budget-s", "0").returncode == 0
    [here] = (tmp_path / "here").glob("convergence_*.json")
    other = tmp_path / "convergence_other-gpu.json"
    report = json.loads(here.read_text())
    report["device"]["name"] = "NVIDIA Some Other GPU"
    other.write_text(json.dumps(report))
    fresh = _conv(tmp_path / "fresh", "--backends", "torch", "--time-budget-s", "0", "--resume", str(other))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "WARNING" in fresh.stderr and "NVIDIA Some Other GPU" in fresh.stderr and "starts fresh" in fresh.stderr
    [path] = (tmp_path / "fresh").glob("convergence_*.json")
    resumed = json.loads(path.read_text())["resumed"]
    assert resumed["from"] is None and "NVIDIA Some Other GPU" in resumed["passed_over"][0]
    both = _conv(tmp_path / "both", "--backends", "torch", "--time-budget-s", "0", "--resume", str(other), str(here))
    assert both.returncode == 0 and "WARNING" not in both.stderr, both.stderr[-3000:]
    [path] = (tmp_path / "both").glob("convergence_*.json")
    assert json.loads(path.read_text())["resumed"]["from"] == str(here)
    # A file not written yet (the other GPU kind's, no lease drew it): passed over too.
    missing = _conv(tmp_path / "missing", "--backends", "torch", "--time-budget-s", "0", "--resume",
                    str(tmp_path / "convergence_not-yet.json"), str(here))
    assert missing.returncode == 0 and "WARNING" not in missing.stderr, missing.stderr[-3000:]
    [path] = (tmp_path / "missing").glob("convergence_*.json")
    resumed = json.loads(path.read_text())["resumed"]
    assert resumed["from"] == str(here) and "no such file" in resumed["passed_over"][0]


def test_a_failing_run_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    """An exception in a run (a backend's error, an out-of-memory) is that run's row, saying why;
    the runs after it still run, every file is written, and the script exits non-zero at the end
    (a lease must not lose the other runs to one failure). Here the two reference runs fail: the
    criteria of the others are computed without them."""
    pytest.importorskip("adam_mini")
    import importlib.util

    import torch

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ and the root first: undone after
    spec = importlib.util.spec_from_file_location("convergence_under_test", ROOT / "bench" / "convergence.py")
    convergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convergence)
    real_train = convergence.train

    def train(run, *args, **kwargs):
        if run in ("official", "AdamW"):
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return real_train(run, *args, **kwargs)

    monkeypatch.setattr(convergence, "train", train)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        with pytest.raises(SystemExit, match="2 run.s. failed: official, AdamW"):
            convergence.main(["--preset", "smoke", "--steps", "2", "--backends", "torch", "--device", "cpu",
                              "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    [path] = tmp_path.glob("convergence_*.json")
    report = json.loads(path.read_text())
    runs = report["results"]
    for name in ("official", "AdamW"):
        assert runs[name]["failed"] and "RuntimeError: CUDA out of memory" in runs[name]["not_run"], name
    assert all(len(r["train_loss"]) == 2 for name, r in runs.items() if name not in ("official", "AdamW")), sorted(runs)
    assert "curve_rel_diff_vs_official" not in report["criteria"]["AdamMini[torch]"]
    assert report["complete"] and "AdamW | not run: failed: RuntimeError" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").exists()
