"""bench/memory_table.py in its --quick mode (tiny Llama shapes, seconds): every row of the
issue-10 memory table is in the results, measured or saying why not, and int8 m makes AdamMini's
state smaller than float32 m."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["adamw", "adamw8bit-torchao", "adamw8bit-bnb", "official", "ours-fp32", "ours-bf16", "ours-fp32-int8",
        "ours-bf16-int8"]


def test_memory_table_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/memory_table.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [json_path] = tmp_path.glob("memory_table_cpu_*_quick.json")
    report = json.loads(json_path.read_text())
    table = json_path.with_suffix(".md").read_text()
    for key in ("date", "device", "versions", "git", "set", "rows", "int8_criterion"):
        assert key in report, key
    assert report["versions"]["torch"] and report["full_shapes"] is False
    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        assert r["label"] in table
        if r["status"] == "ok":
            assert r["bytes_per_param"] == pytest.approx(r["state_bytes"] / report["set"]["n_params"])
        else:
            assert r["status"] == "not runnable" and r["reason"].startswith("not runnable here: "), r
            assert r["reason"] in table
    # Those that need nothing beyond the test requirements always run.
    for key in ("adamw", "official", "ours-fp32", "ours-bf16", "ours-fp32-int8", "ours-bf16-int8"):
        assert rows[key]["status"] == "ok", rows[key]
    assert rows["adamw"]["bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert rows["ours-fp32"]["bytes_per_param"] == pytest.approx(rows["official"]["bytes_per_param"], abs=0.01)
    assert rows["ours-bf16"]["bytes_per_param"] < rows["ours-fp32"]["bytes_per_param"]
    for key in ("ours-fp32-int8", "ours-bf16-int8"):
        assert rows[key]["bytes_per_param"] < rows["ours-fp32"]["bytes_per_param"]
        assert key in report["int8_criterion"]
    # AdamMini's state is allocated in full by its first step(): an update does not change it.
    for key in ("ours-fp32", "ours-bf16", "ours-fp32-int8", "ours-bf16-int8"):
        assert rows[key]["state_bytes_after_update"] == rows[key]["state_bytes"], rows[key]
