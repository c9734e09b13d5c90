"""`make demo` must keep working: its quick mode trains both optimizers end to end and writes the
loss-curve PNG and JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the quick CPU run is the CI check")
def test_demo_quick_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "demo.train", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    png = tmp_path / "loss_curves.png"
    assert png.stat().st_size > 10_000
    assert str(png) in result.stdout
    results = json.loads((tmp_path / "loss_curves.json").read_text())["results"]
    assert set(results) == {"AdamMini", "AdamW"}
    for name, run in results.items():
        val = [e["val"] for e in run["evals"]]
        assert len(val) >= 2 and all(v == v and v < 10 for v in val), (name, val)  # finite, sane
        assert val[-1] < val[0], (name, val)  # it learns, even in 20 steps
        assert run["step_ms"] > 0
    assert results["AdamMini"]["state_bytes_per_param"] < results["AdamW"]["state_bytes_per_param"]
