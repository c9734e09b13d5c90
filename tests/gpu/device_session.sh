#!/usr/bin/env bash
# Every GPU check of the open issues in ONE call of the lent GPU machine (device tool, 15 minutes
# of device time per task, 10 per command), under a deadline, most needed first:
#
#   1. device and versions; the official package from wheels/ (if carried); build the extension
#   2. the test suite on the GPU (pytest-xdist; the tests that need a CPU interpreter or
#      transformers skip) beside compute-sanitizer memcheck + racecheck of both fused backends
#   3. the >2^31-element buffer tests (alone: they take ~20 GB each)
#   4. the step benchmark (the SPEC sets and the sweep, with the anchors; no torch.compile rows)
#      in whatever time is left, alone on the GPU
#
# Run from the repository root:  OUT=$OUT bash tests/gpu/device_session.sh   (device tool: carry
# ["wheels"], timeout_s 600). BUDGET_S (default 560) is the whole script's time. What comes back
# (at most 8 files): summary.txt, logs.tgz (re-packed after every stage, so a killed run still
# returns what it did), and the benchmark's .json/.md/.png. Exit status: non-zero if any check
# failed. The commit benchmarked: BENCH_COMMIT (the tree there is no git checkout). TESTS (default
# "tests") and BENCH_ARGS (more bench_step.py flags, e.g. '--sets ""' or '--smoke' for a dry run
# of this script on a CPU) narrow a rerun.
set -uo pipefail
OUT=${OUT:-/tmp/device_session}
BUDGET_S=${BUDGET_S:-560}
LOGS=/tmp/device_session_logs
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=16
export PATH="$PATH:$CUDA_HOME/bin"  # compute-sanitizer, when it is not on PATH already
unset TRITON_INTERPRET
status=0
left() { echo $((BUDGET_S - SECONDS)); }
note() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/summary.txt"; }
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
fail() { status=1; note "FAILED: $*"; }

note "device session, budget ${BUDGET_S}s, commit ${BENCH_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/summary.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
which compute-sanitizer >> "$OUT/summary.txt" 2>&1 || note "no compute-sanitizer on PATH"

# 1. Install and build.
if ls wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
    > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site || fail "wheel install"
fi
timeout 180 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/build.log" 2>&1 || fail "build (see build.log)"
$PY -c "import adam_mini_kernels as a; print('backends:', a.available_backends())" 2>&1 | tee -a "$OUT/summary.txt"
$PY -c "import adam_mini; print('official adam-mini', adam_mini.__file__)" >> "$OUT/summary.txt" 2>&1 || note "official adam-mini missing: its parity tests skip (carry wheels/)"
note "build done"; pack

# 2. Tests on the GPU beside the sanitizers (correctness only: nothing is timed here).
tests_s=$(( $(left) - 210 )); [ "$tests_s" -gt 300 ] && tests_s=300; [ "$tests_s" -lt 30 ] && tests_s=30
timeout "$tests_s" $PY -m pytest -q -ra -p no:cacheprovider -n 8 --timeout 240 -k "not 2_pow_31" \
  --junitxml="$LOGS/pytest.xml" ${TESTS:-tests} > "$LOGS/pytest.log" 2>&1 &
pytest_pid=$!
sanitize() {  # tool backend seconds
  timeout "$3" compute-sanitizer --tool "$1" --error-exitcode 1 $PY tests/gpu/sanitize_step.py "$2" > "$LOGS/sanitize_$2_$1.log" 2>&1
}
for tool in memcheck racecheck; do
  sanitize $tool cuda 100 & a=$!
  sanitize $tool triton 100 & b=$!
  wait $a; rc_a=$?; wait $b; rc_b=$?
  note "sanitizer $tool: cuda rc=$rc_a ($(tail -1 "$LOGS/sanitize_cuda_$tool.log")), triton rc=$rc_b ($(tail -1 "$LOGS/sanitize_triton_$tool.log"))"
  [ $rc_a -eq 0 ] || fail "sanitizer $tool cuda"
  [ $rc_b -eq 0 ] || fail "sanitizer $tool triton"
done
pack
wait $pytest_pid; rc=$?
note "pytest rc=$rc: $(tail -1 "$LOGS/pytest.log")"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest.log" | head -40 >> "$OUT/summary.txt"
[ $rc -eq 0 ] || fail "pytest (rc $rc; 124 = out of time)"
pack

# 3. The >2^31-element buffers, alone.
big_s=$(( $(left) - 150 )); [ "$big_s" -gt 120 ] && big_s=120
if [ "$big_s" -gt 20 ]; then
  timeout "$big_s" $PY -m pytest -q -ra -p no:cacheprovider -k "2_pow_31" ${TESTS:-tests} > "$LOGS/pytest_2pow31.log" 2>&1; rc=$?
  note "pytest 2^31 rc=$rc: $(tail -1 "$LOGS/pytest_2pow31.log")"
  [ $rc -eq 0 ] || fail "pytest 2^31 (rc $rc)"
else
  note "skipped the 2^31 tests: out of time"
fi
pack

# 4. The benchmark, alone on the GPU, in what is left (it starts no row after --time-budget-s and
# rewrites its JSON after every row).
bench_s=$(( $(left) - 25 ))
if [ "$bench_s" -gt 60 ]; then
  timeout $((bench_s + 20)) $PY bench/bench_step.py --out "$OUT" --commit "${BENCH_COMMIT:-unknown}" --no-progress \
    --optimizers ours,adamw-foreach,adamw-fused,official --time-budget-s $((bench_s - 30)) ${BENCH_ARGS:-} > "$LOGS/bench_step.log" 2>&1; rc=$?
  note "bench rc=$rc: $($PY -c "import collections, glob, json; d = json.load(open(sorted(glob.glob('$OUT/*.json'))[-1])); print('rows by status', dict(collections.Counter(r['status'] for r in d['rows'])), 'complete', d['complete'])" 2>&1 | tail -1)"
  [ $rc -eq 0 ] || fail "bench (rc $rc)"
else
  note "skipped the benchmark: out of time"
fi
pack
note "done, status $status"
exit $status
