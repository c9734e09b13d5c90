"""The per-kernel microbenchmarks (bench/microbench.py) in their CPU dry-run mode, so that they
cannot rot: every path (rows, large blocks, Adam tiles) at every dry-run size and dtype steps the
Triton kernels under the interpreter and the torch backend, each compared by the script with the
reference step; a backend that cannot run here (cuda) is reported with its reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "microbench.py"
POINTS = {"rows": 3, "large": 2, "adam": 2}  # dry-run sizes per path (microbench.run_dry)
DTYPES = ["float32", "bfloat16"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check; on a GPU run the benchmark")


def test_microbench_dry_run_checks_every_path():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"microbench.py --dry-run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = re.findall(r"dry run: +(\w+) size +(\d+) +(\w+) +(\w+): +(\d+) min bytes, rel err p (\S+), v (\S+) (\w+)", proc.stdout)
    assert all(status == "ok" for *_, status in lines), proc.stdout
    try:  # a CPU-only torch build brings no triton: the script says so, and the torch rows still run
        import triton  # noqa: F401
        backends = ("triton", "torch")
    except ImportError:
        backends = ("torch",)
        assert re.search(r"backend 'triton' skipped: .+", proc.stdout), proc.stdout
    for path, count in POINTS.items():
        for dtype in DTYPES:
            for backend in backends:
                rows = [r for r in lines if r[0] == path and r[2] == dtype and r[3] == backend]
                assert len(rows) == count, (path, dtype, backend, proc.stdout)
                assert all(int(r[4]) > 0 and float(r[5]) <= 2e-2 for r in rows), rows
    assert re.search(r"backend 'cuda' skipped: .+", proc.stdout), proc.stdout


def test_microbench_writes_meta_json_beside_its_csvs(tmp_path):
    """run_gpu writes meta.json into its output folder: device, versions, commit, UTC date."""
    import datetime
    import json

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import microbench
    finally:
        sys.path.remove(str(REPO / "bench"))
    now = datetime.datetime(2026, 12, 7, 21, 0, tzinfo=datetime.timezone.utc)
    meta = json.loads(microbench.write_meta(tmp_path, "NVIDIA H100 80GB HBM3", "abc1234", now).read_text())
    assert meta["device"] == "NVIDIA H100 80GB HBM3"
    assert meta["torch"] == torch.__version__ and meta["cuda"] == torch.version.cuda
    assert "triton" in meta
    assert meta["git"]["commit"] == "abc1234"
    assert meta["date"] == "2026-12-07" and meta["datetime_utc"].startswith("2026-12-07T21:00")
    assert microbench.parse_args(["--commit", "abc1234"]).commit == "abc1234"
