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

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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
# A sanitizer run of a script reports no errors, unrun (the kernels need a GPU: here only the
# script's flow is checked), saying whether PyTorch's caching allocator was off;
# FAKE_SANITIZER=unsupported: it refuses the device as on gVisor.
FAKE_SANITIZER = """#!/usr/bin/env bash
case " $* " in
  *" --version "*) echo "NVIDIA (R) Compute Sanitizer"; echo "Version 2099.1.0 (dry run)"; exit 0 ;;
esac
if [ "${FAKE_SANITIZER:-}" = unsupported ]; then
  echo "========= Error: Device not supported"
  echo "RuntimeError: CUDA error: unknown error (error 999)"; exit 1
fi
[ -n "${PYTORCH_NO_CUDA_MEMORY_CACHING:-}" ] && allocator=off || allocator=on
echo "========= ERROR SUMMARY: 0 errors (dry run, caching allocator $allocator: $2 ${@: -1})"
"""
# tar, recording its arguments (where the script writes its archive) in $TAR_CALLS.
FAKE_TAR = """#!/usr/bin/env bash
echo "$*" >> "$TAR_CALLS"
exec {tar} "$@"
"""
# Python, but `-m pip install` and the sanitizer workload (it needs a CUDA device; taking
# FAKE_STEP_S seconds) are faked.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then echo "dry run: pip $*"; exit 0; fi
if [ "$1" = "tests/gpu/sanitize_step.py" ]; then sleep "${{FAKE_STEP_S:-0}}"; echo "sanitize_step: $2 ok (dry run)"; exit 0; fi
exec {python} "$@"
"""
# Each test appends its name to $TINY_ORDER: the order of the script's pytest runs. TINY_SLEEP:
# seconds the GPU-marked one takes.
TINY_TESTS = """
import os
import time

import pytest


def _ran(name):
    with open(os.environ["TINY_ORDER"], "a") as f:
        f.write(name + "\\n")


@pytest.mark.gpu
def test_gpu_marked():
    _ran("gpu")
    time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
    assert (os.environ.get("OMP_NUM_THREADS"), os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")) == ("2", "1")


def test_threads_per_worker():
    _ran("rest")
    assert (os.environ.get("OMP_NUM_THREADS"), os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")) == ("2", "1")


def test_2_pow_31_selected_alone():
    _ran("2_pow_31")
    assert 2 ** 31 > 2 ** 31 - 1
"""


def _dry_run(tmp_path: Path, session: str, **env: str) -> tuple[int, str, Path]:
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("compute-sanitizer", FAKE_SANITIZER),
                       ("python", FAKE_PYTHON.format(python=sys.executable)), ("tar", FAKE_TAR.format(tar=shutil.which("tar")))):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    tests = tmp_path / "tiny" / "test_tiny.py"
    tests.parent.mkdir()
    tests.write_text(TINY_TESTS)
    out = tmp_path / "out"
    # A log of an earlier call on the same (warm) machine, which the script must not pack.
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "stale_from_the_call_before.log").write_text("stale")
    run_env = {
        **os.environ, "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(fakes / "python"),
        "SESSION": session, "BENCH_COMMIT": "dryrun", "OUT": str(out), "LOGS": str(tmp_path / "logs"),
        "TESTS": str(tests), "BENCH_ARGS": "--smoke", "CONV_ARGS": "--preset smoke --backends torch",
        "PYTEST_WORKERS": "1", "TAR_CALLS": str(tmp_path / "tar_calls"),
        "TINY_ORDER": str(tmp_path / "order"), **env,
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


SANITIZER_RUNS = [("memcheck", "cuda"), ("memcheck", "triton"), ("racecheck", "cuda"), ("racecheck", "triton"),
                  ("synccheck", "cuda"), ("initcheck", "cuda")]


@pytest.mark.parametrize("session, expected, cpu_failures", [
    ("checks", ["bench rc=0: ", "pytest gpu rc=0: 1 passed", "pytest rest rc=0: 1 passed", "compute-sanitizer: /",
                "pytest and sanitizers: limit ",
                "sanitize_step.py triton without a sanitizer rc=0 (limit 60s): sanitize_step: triton ok",
                "sanitize_step.py cuda without a sanitizer rc=0 (limit 60s): sanitize_step: cuda ok"]
     + [f"sanitizer {tool} {backend} rc=0 (limit " for tool, backend in SANITIZER_RUNS]
     + ["pytest 2^31 rc=0: 1 passed"], []),
    # The graph rows' sets at smoke size: their GPU-size names are checked below.
    ("variants", ["bench_variants rc=0: ", "bench_graphs rc=0: "], []),
    ("convergence", ["convergence rc=0: "], []),
    # bench/microbench.py refuses a machine without a GPU (its own CPU check is --dry-run).
    ("rest", ["bench_compile rc=0: ", "host_overhead rc=0 (limit 60s): ", "microbench rc=2"], ["FAILED: microbench (rc 2)"]),
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
    if session == "variants":  # the bfloat16 set first (its rows alone have stochastic rounding, float32 state)
        rows = json.loads(next(out.glob("*_variants.json")).read_text(encoding="utf-8"))["rows"]
        assert list(dict.fromkeys(r["set"] for r in rows)) == ["llama-1.1b-bf16", "llama-1.1b-fp32", "gpt2-124m-fp32"], rows
    files = sorted(p.name for p in out.iterdir())
    assert "logs.tgz" in files and len(files) <= 8, files
    assert "stale_from_the_call_before.log" not in _packed(out), "the logs of an earlier call were packed"
    # logs.tgz is written outside $OUT and moved there (a kill mid-tar leaves the last whole one).
    archives = [line.split()[1] for line in (tmp_path / "tar_calls").read_text().splitlines()]
    assert archives and all(not a.startswith(str(out)) for a in archives), archives
    if session != "convergence":
        assert any(name.endswith(".png") for name in files) and any(name.endswith(".json") for name in files), files
    else:
        assert any(name.startswith("convergence_") and name.endswith(".json") for name in files), files


def _packed(out: Path) -> list[str]:
    with tarfile.open(out / "logs.tgz") as tar:
        return [Path(name).name for name in tar.getnames()]


def _packed_text(out: Path, name: str) -> str:
    with tarfile.open(out / "logs.tgz") as tar:
        return tar.extractfile(f"./{name}").read().decode()


def _sanitizer_limits(summary: str) -> dict[tuple[str, str], int]:
    return {(m[1], m[2]): int(m[3]) for m in re.finditer(r"\] sanitizer (\w+) (\w+) rc=\d+ \(limit (\d+)s", summary)}


def test_checks_sanitizers_and_pytest(tmp_path):
    """The checks session's sanitizer runs: memcheck and initcheck (only) without PyTorch's caching
    allocator, the first error line of each log and the tool's path and version in the summary,
    each run's limit derived from what is left of pytest's (BUDGET_S 200: under the 100 s cap);
    pytest with two threads a worker (the tiny tests check), --durations, the tests marked gpu
    first, then the rest, then the 2^31 ones alone. The benchmark's budget
    is what is left after the build but the 110 s of the stages after it (not its 190 s)."""
    rc, summary, out = _dry_run(tmp_path, "checks", BUDGET_S="200")
    assert rc == 1 and _failures(summary) == [CUDA_MISSING + ": backends: ['torch']"], summary
    build = int(re.search(r"\+(\d+)s\] build done", summary)[1])
    bench = re.search(r"\] (bench rc=0: .*\(budget |skipped bench: out of time \()(-?\d+)s", summary)
    assert 200 - 110 - build - 2 <= int(bench[2]) <= 200 - 110 - build, (build, bench[0])
    assert (int(bench[2]) >= 60) == bench[1].startswith("bench rc=0"), bench[0]  # a slow build: no time for it
    assert "Version 2099.1.0 (dry run)" in _line(summary, "compute-sanitizer: /")
    stage = int(re.search(r"pytest and sanitizers: limit (\d+)s", summary)[1])
    limits = _sanitizer_limits(summary)
    assert list(limits) == SANITIZER_RUNS, summary
    assert all(30 <= s <= min(100, stage - 20) for s in limits.values()) and stage < 120, (stage, limits)
    assert limits[("memcheck", "cuda")] == limits[("memcheck", "triton")] >= limits[("synccheck", "cuda")]
    for tool, backend in SANITIZER_RUNS:
        line = _line(summary, f"sanitizer {tool} {backend} rc=0")
        nocache = tool in ("memcheck", "initcheck")
        assert ("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line) == nocache, line
        assert line.endswith(f"ERROR SUMMARY: 0 errors (dry run, caching allocator {'off' if nocache else 'on'}: {tool} {backend})"), line
    for log in ("pytest_gpu.log", "pytest_rest.log"):
        assert "slowest 30 durations" in _packed_text(out, log), log
    assert (tmp_path / "order").read_text().split() == ["gpu", "rest", "2_pow_31"], summary
    assert summary.index("] pytest gpu rc=0: 1 passed") < summary.index("] pytest rest rc=0: 1 passed"), summary


def test_checks_sanitizers_out_of_time(tmp_path):
    """With too little left of pytest's limit for a sanitizer run (30 s at least), each is skipped
    and said so, none started; the rest of the session still runs."""
    # BUDGET_S 90: no benchmark (under 60 s for it), pytest's limit all but 25 s of what is left
    # (under 60 s after the 80 s kept): 65 s less the build's b (~10 s here), and the sanitizer runs
    # 20 s less (KILL grace) less 10 s of the unsanitized runs when they run (b <= 25): under 30 s
    # for any b over 5 s, and pytest still runs (30 s at least) for b up to 35 s.
    rc, summary, out = _dry_run(tmp_path, "checks", BUDGET_S="90", FAKE_STEP_S="10")
    assert rc == 1 and _failures(summary) == [CUDA_MISSING + ": backends: ['torch']"], summary
    assert _sanitizer_limits(summary) == {}, summary
    for runs in ("memcheck:cuda memcheck:triton", "racecheck:cuda racecheck:triton", "synccheck:cuda initcheck:cuda"):
        _line(summary, f"skipped sanitizer {runs}: out of time")
    _line(summary, "skipped bench: out of time")
    _line(summary, "pytest gpu rc=0: 1 passed")
    _line(summary, "pytest rest rc=0: 1 passed")


def test_checks_gpu_tests_first_then_the_rest_in_what_is_left(tmp_path):
    """The tests marked gpu run first, under pytest's whole limit; the rest get what is left of
    it and are not started under 30 s: here the GPU-marked test outlasts the limit (stopped at it,
    a failure), so the rest are skipped, and said so."""
    rc, summary, out = _dry_run(tmp_path, "checks", BUDGET_S="100", TINY_SLEEP="300")
    failures = _failures(summary)
    assert rc == 1 and failures[0] == CUDA_MISSING + ": backends: ['torch']", summary
    assert [f.split(" (")[0] for f in failures[1:]] == ["FAILED: pytest gpu"] and "rc 124" in failures[1], summary
    _line(summary, "pytest gpu rc=124: ")
    _line(summary, "skipped pytest rest: out of time (")
    assert (tmp_path / "order").read_text().split()[:1] == ["gpu"] and "rest" not in (tmp_path / "order").read_text()


@pytest.mark.parametrize("session, skipped", [
    ("checks", ["bench", "pytest and the sanitizers", "the 2^31 tests"]),
    ("variants", ["bench_variants", "bench_graphs"]),
    # convergence.py would refuse a negative --time-budget-s (rc 2).
    ("convergence", ["convergence"]),
    ("rest", ["bench_compile", "host_overhead", "the microbenchmarks"]),
])
def test_small_budget_skips_what_does_not_fit(tmp_path, session, skipped):
    """BUDGET_S 40 (less than any stage's minimum after the build): every stage is skipped with a
    note saying so, none started with a limit beyond the budget, no failure but the CPU's, and
    the script ends within it."""
    rc, summary, out = _dry_run(tmp_path, session, BUDGET_S="40")
    assert rc == 1 and _failures(summary) == [CUDA_MISSING + ": backends: ['torch']"], summary
    for stage in skipped:
        _line(summary, f"skipped {stage}: out of time (")
    assert not re.search(r"\] (bench\w* |pytest |sanitizer |convergence |host_overhead |microbench )rc=", summary), summary
    assert int(re.search(r"\+(\d+)s\] done, status 1", summary)[1]) <= 40, summary
    assert "logs.tgz" in {p.name for p in out.iterdir()}


def test_checks_sanitizer_refusing_the_device(tmp_path):
    """A sanitizer that refuses the device (gVisor) is told from the memcheck logs themselves (no
    probe): UNSUPPORTED HERE, not a failure, and no further sanitizer run."""
    rc, summary, out = _dry_run(tmp_path, "checks", FAKE_SANITIZER="unsupported")
    assert rc == 1 and _failures(summary) == [CUDA_MISSING + ": backends: ['torch']"], summary
    assert list(_sanitizer_limits(summary)) == [("memcheck", "cuda"), ("memcheck", "triton")], summary
    assert "Device not supported" in _line(summary, "compute-sanitizer: UNSUPPORTED HERE")
    assert {"sanitize_cuda_memcheck.log", "sanitize_triton_memcheck.log"} <= set(_packed(out))
    _line(summary, "pytest gpu rc=0: 1 passed")
    _line(summary, "pytest rest rc=0: 1 passed")


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
    assert len([line for line in lines if line.startswith("sanitize_step: triton torch.")]) == 9, lines


def _script_function(name: str) -> str:
    """The text of one shell function of the script (from `name() {` to the `}` closing it)."""
    text = SCRIPT.read_text(encoding="utf-8")
    return re.search(rf"^{name}\(\) \{{.*?^\}}$", text, re.M | re.S)[0]


def test_rows_without_a_results_json_says_so(tmp_path):
    """rows(), the benchmark's summary line: a stage that wrote no JSON of its tag is said so (it was
    a Python IndexError); a JSON of the tag gives the status counts."""
    code = f'OUT={tmp_path}; PY={sys.executable}\n{_script_function("rows")}\nrows variants; rows graphs'
    (tmp_path / "x_variants.json").write_text(json.dumps({"rows": [{"status": "ok"}, {"status": "skipped"}], "complete": True}))
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["x_variants.json {'ok': 1, 'skipped': 1} complete True",
                                        f"no results JSON for tag graphs in {tmp_path}"], proc.stdout + proc.stderr


def test_san_first_finds_a_race(tmp_path):
    """san_first(), a sanitizer log's line in the summary: racecheck's "Race reported" finding is its
    first error line, and it is no refusal of the device (san_refused)."""
    log = tmp_path / "racecheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= Error: Race reported between Write access at kernel+0x10\n"
                   "RuntimeError: CUDA error: unknown error\n========= RACECHECK SUMMARY: 1 hazard displayed\n")
    script = SCRIPT.read_text(encoding="utf-8")
    finding = re.search(r"^SAN_FINDING=.*$", script, re.M)[0]
    code = f'{finding}\n{_script_function("san_first")}\n{_script_function("san_refused")}\n'
    code += f'san_first {log}; san_refused {log} && echo refused || echo finding'
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    race = "========= Error: Race reported between Write access at kernel+0x10"
    assert proc.stdout.splitlines() == [race, "finding"], proc.stdout
