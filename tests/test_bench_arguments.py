"""The bench scripts and the demo refuse counts and sizes no run can use when the command line is
parsed (argparse's exit status 2, the argument named), instead of dropping them (``--steps 0``
read as "the preset's steps") or failing later in the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import arguments  # noqa: E402


@pytest.mark.parametrize("script, argv", [
    ("bench/convergence.py", ["--steps=0"]),
    ("bench/convergence.py", ["--interpreter-steps=-1"]),
    ("bench/convergence.py", ["--lr=-1e-3"]),
    ("bench/convergence.py", ["--lr=nan"]),
    ("bench/host_overhead.py", ["--steps=0"]),
    ("bench/bench_step.py", ["--smoke", "--rep-ms=0"]),
    ("bench/bench_step.py", ["--smoke", "--warmup-steps=-1"]),
    ("bench/bench_step.py", ["--smoke", "--copy-bytes=0"]),
    ("bench/bench_step.py", ["--smoke", "--time-budget-s=nan"]),
    ("bench/bench_step.py", ["--smoke", "--time-budget-s=-1"]),
    ("bench/convergence.py", ["--time-budget-s=nan"]),
    ("bench/convergence.py", ["--time-budget-s=inf"]),
    ("bench/predict_bytes.py", ["--gbps=0"]),
    ("bench/predict_bytes.py", ["--gbps=nan"]),
    ("bench/microbench.py", ["--dry-run", "--numel=0"]),
    ("bench/microbench.py", ["--dry-run", "--time-budget-s=-5"]),
    ("bench/microbench.py", ["--dry-run", "--time-budget-s=nan"]),
    ("bench/int8_m_study.py", ["--min-size=-1"]),
    ("-m demo.train", ["--steps=0"]),
])
def test_scripts_refuse_unusable_numbers(script, argv):
    result = subprocess.run([sys.executable, *script.split(), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    name, value = argv[-1].split("=")
    assert f"argument {name}" in result.stderr and value in result.stderr


def test_argument_types():
    assert arguments.positive_int("3") == 3 and arguments.nonnegative_int("0") == 0
    assert arguments.positive_float("0.5") == 0.5 and arguments.nonnegative_float("0") == 0.0
    for parse, text in [(arguments.positive_int, "0"), (arguments.nonnegative_int, "-1"),
                        (arguments.positive_float, "0"), (arguments.positive_float, "inf"),
                        (arguments.nonnegative_float, "-0.1"), (arguments.nonnegative_float, "nan")]:
        with pytest.raises(Exception, match="must be"):
            parse(text)
