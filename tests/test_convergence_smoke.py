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
    assert abs(int8["final_val_rel_vs_fp32_state"]) < 0.05 and isinstance(int8["int8_final_within_1pct"], bool)
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
