"""bench/host_overhead.py in its --quick mode (seconds): a row per parameter set and lr mode, with
positive, ordered block statistics, in the JSON and the markdown table."""

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_quick(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    result = subprocess.run(
        [sys.executable, "bench/host_overhead.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [json_path] = tmp_path.glob("host_overhead_cpu_*_quick.json")
    report = json.loads(json_path.read_text())
    for key in ("date", "device", "torch", "git", "rows"):
        assert key in report, key
    # Named as bench_step.py's files: the device's name ("CPU" here) and the UTC date.
    assert report["device_name"] == "CPU" and json_path.name == f"host_overhead_cpu_{report['date']}_quick.json"
    assert report["date"] in (before, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")), report["date"]
    rows = report["rows"]
    assert [(r["tensors"], r["lr"]) for r in rows] == [
        (148, "constant"), (148, "LambdaLR every step"), (201, "constant"), (201, "LambdaLR every step")
    ]
    for r in rows:
        assert 0 < r["best_block_us"] <= r["p20_us"] <= r["median_us"] <= r["p80_us"], r
        assert r["blocks"] == r["steps"] // 50 and r["backend"] == "torch"
    table = json_path.with_suffix(".md").read_text()
    assert table.count("\n| gpt2-small tensors (148) |") == 2 and "best block" in table
