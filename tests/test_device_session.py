"""tests/gpu/device_session.sh, the script a GPU lease runs, dry-run on the CPU so that it cannot rot.

A lease is scarce (minutes per task, when one is lent at all): a bash slip, a renamed flag or set
key, or a stage whose summary line is lost would waste one. Each session runs here as the
script's header says, with a fake ``nvidia-smi`` and ``compute-sanitizer`` on PATH and a Python
wrapper that fakes ``-m pip install``; the benchmark runs in its smoke mode, pytest on a tiny test
file. The CPU cannot give the extension a CUDA device, so the one failure every session reports
here is "'cuda' is not in available_backends()"; any other FAILED line is a defect of the script.
The sets the script names at GPU size (its graph rows) are checked against the benchmark's sets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "gpu" / "device_session.sh"
CUDA_MISSING = "FAILED: 'cuda' is not in available_backends() after the build"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run of the CPU; on a GPU run the script itself")

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
echo "name, driver_version, memory.total [MiB], clocks.max.sm [MHz], clocks.max.memory [MHz]"
echo "CPU dry run, 0, 0 MiB, 0 MHz, 0 MHz"
"""
# The probe (`python -c ...`) succeeds; a sanitizer run of a script reports no errors, unrun (the
# kernels need a GPU: here only the script's flow is checked).
FAKE_SANITIZER = """#!/usr/bin/env bash
case " $* " in
  *" -c "*) echo "sanitizer probe ok 1024.0" ;;
  *) echo "========= ERROR SUMMARY: 0 errors (dry run: $*)" ;;
esac
"""
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then echo "dry run: pip $*"; exit 0; fi
exec {python} "$@"
"""
TINY_TESTS = """
def test_one():
    assert 1 + 1 == 2


def test_2_pow_31_selected_alone():
    assert 2 ** 31 > 2 ** 31 - 1
"""


def _dry_run(tmp_path: Path, session: str, **env: str) -> tuple[int, str, Path]:
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("compute-sanitizer", FAKE_SANITIZER),
                       ("python", FAKE_PYTHON.format(python=sys.executable))):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    tests = tmp_path / "tiny" / "test_tiny.py"
    tests.parent.mkdir()
    tests.write_text(TINY_TESTS)
    out = tmp_path / "out"
    run_env = {
        **os.environ, "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(fakes / "python"),
        "SESSION": session, "BENCH_COMMIT": "dryrun", "OUT": str(out), "LOGS": str(tmp_path / "logs"),
        "TESTS": str(tests), "BENCH_ARGS": "--smoke", "CONV_ARGS": "--preset smoke --backends torch",
        "PYTEST_WORKERS": "1", **env,
    }
    run_env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=400)
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    return proc.returncode, summary, out


def _failures(summary: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in summary.splitlines() if "] FAILED: " in line]


def _line(summary: str, prefix: str) -> str:
    hits = [line for line in summary.splitlines() if re.search(r"\] " + re.escape(prefix), line)]
    assert len(hits) == 1, (prefix, summary)
    return hits[0]


@pytest.mark.parametrize("session, expected, cpu_failures", [
    ("checks", ["bench rc=0: ", "pytest rc=0: 1 passed", "sanitizer memcheck: cuda rc=0",
                "sanitizer racecheck: cuda rc=0", "pytest 2^31 rc=0: 1 passed"], []),
    # The graph rows' sets at smoke size: their GPU-size names are checked below.
    ("variants", ["bench_variants rc=0: ", "bench_graphs rc=0: "], []),
    ("convergence", ["convergence rc=0: "], []),
    # bench/microbench.py refuses a machine without a GPU (its own CPU check is --dry-run).
    ("rest", ["bench_compile rc=0: ", "host_overhead rc=0: ", "microbench rc=2"], ["FAILED: microbench (rc 2)"]),
])
def test_session_dry_run(tmp_path, session, expected, cpu_failures):
    """Every stage of the session runs and writes its summary line; the only failures are those
    of the CPU (no CUDA device); the result files and the packed logs come back, at most 8 files."""
    env = {"GRAPH_SETS": "sweep-llama-19.6k,gpt2-124m-fp32"} if session == "variants" else {}
    rc, summary, out = _dry_run(tmp_path, session, **env)
    assert rc == 1, summary  # the CPU's failures, and nothing else (below)
    assert _failures(summary) == [CUDA_MISSING + ": backends: ['torch']"] + cpu_failures, summary
    assert f"device session '{session}', budget 560s, commit dryrun" in summary
    assert "CPU dry run" in summary and "build done" in summary and "done, status 1" in summary
    for prefix in expected:
        _line(summary, prefix)
    for line in summary.splitlines():
        if re.search(r"\] bench(_\w+)? rc=0: ", line):
            assert "complete True" in line and "'ok':" in line, line
    files = sorted(p.name for p in out.iterdir())
    assert "logs.tgz" in files and len(files) <= 8, files
    if session != "convergence":
        assert any(name.endswith(".png") for name in files) and any(name.endswith(".json") for name in files), files
    else:
        assert any(name.startswith("convergence_") and name.endswith(".json") for name in files), files


def test_unknown_session_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SESSION": "benchmarks", "OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "logs")})
    assert proc.returncode == 2 and "SESSION must be checks, variants, convergence or rest, got 'benchmarks'" in proc.stderr


def test_graph_sets_are_sets_of_the_benchmark_at_gpu_size():
    """The default GRAPH_SETS of the variants session name sets bench_step.py knows without
    --smoke (a sweep size renamed by a change of its shapes would fail that stage on the GPU)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import param_sets as PS
    finally:
        sys.path.remove(str(REPO / "bench"))
    default = re.search(r"GRAPH_SETS:-([^}]+)\}", SCRIPT.read_text(encoding="utf-8"))
    assert default is not None
    known = set(PS.SET_KEYS) | {s.key for s in PS.sweep_sets(smoke=False)}
    names = default.group(1).split(",")
    assert len(names) == 3 and set(names) <= known, (names, sorted(known))


@pytest.mark.parametrize("script", ["device_session.sh", "run_suite.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "tests" / "gpu" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sanitizer_script_runs_on_the_interpreter():
    """tests/gpu/sanitize_step.py, which the checks session runs under compute-sanitizer, steps
    every configuration it names (and finds every kind of launch in its parameter set) on the
    CPU through Triton's interpreter: an API change that breaks it fails here, not in a lease."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests/gpu'); import sanitize_step; "
            "sys.exit(sanitize_step.main('triton', device='cpu'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "sanitize_step: triton ok"
    assert len([line for line in lines if line.startswith("sanitize_step: triton torch.")]) == 8, lines
