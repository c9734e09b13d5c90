#!/usr/bin/env bash
# The GPU checks of the open issues as ONE call of the lent GPU machine each (device tool: 15
# minutes of device time per task, 10 per command), under a deadline, most needed first. Which
# call: SESSION (a lease holds one; run them in this order over the leases you get):
#
#   checks (default)  build; the test suite on the GPU (pytest-xdist; tests that need a CPU
#                     interpreter or transformers skip) beside compute-sanitizer memcheck and
#                     racecheck of both fused backends; the >2^31-element tests alone (~20 GB
#                     each); the step benchmark (SPEC sets and sweep, with the anchors, no
#                     torch.compile rows) in the time left, alone on the GPU.
#   variants          build; benchmark rows of issues 6 and 10 on the named sets with the anchors
#                     (float32/int8 state, stochastic rounding, clipping, 8-bit AdamW); the
#                     CUDA-graph replay rows of issue 7 (1M, 10M, 124M parameters).
#   convergence       build; bench/convergence.py --preset gpu (issues 9, 10), as many runs as
#                     the time allows (its files are rewritten after every run).
#   rest              build; the torch.compile rows (about a minute each); the front-end's host
#                     time (bench/host_overhead.py); the microbenchmarks.
#
# Run from the repository root:  SESSION=checks BENCH_COMMIT=<sha> OUT=$OUT bash tests/gpu/device_session.sh
# (device tool: carry ["wheels"] holding the adam-mini 1.1.1 and torchao wheels, timeout_s 600).
# BUDGET_S (default 560) is the whole script's time. What comes back (at most 8 files):
# summary.txt, logs.tgz (re-packed after every stage, so a killed run still returns what it
# did), and the result files of the benchmark (.json/.md/.png) and of the convergence run. Exit
# status: non-zero if any check failed. BENCH_COMMIT: the commit (the tree there is no git
# checkout). TESTS (default "tests"), BENCH_ARGS (more bench_step.py flags) and CONV_ARGS
# (default "--preset gpu") narrow a rerun; a dry run of this script on a CPU: TESTS=one test file,
# BENCH_ARGS=--smoke, CONV_ARGS="--preset smoke", fake nvidia-smi and compute-sanitizer on PATH.
set -uo pipefail
SESSION=${SESSION:-checks}
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
rows() {  # tag: the status counts of the rows of bench_step.py's results JSON of that tag in $OUT
  $PY -c "import collections, glob, json, sys; tag = sys.argv[1]; f = [p for p in sorted(glob.glob('$OUT/*.json')) if 'convergence' not in p and p.endswith(f'_{tag}.json' if tag else '.json')][-1]; d = json.load(open(f)); print(f.split('/')[-1], dict(collections.Counter(r['status'] for r in d['rows'])), 'complete', d['complete'])" "$1" 2>&1 | tail -1
}
bench() {  # seconds tag bench_step.py-flags...: the benchmark, alone on the GPU, starting no row after the budget
  local seconds=$1 tag=$2; shift 2
  local log="bench${tag:+_$tag}"
  if [ "$seconds" -lt 60 ]; then note "skipped $log: out of time"; return; fi
  timeout $((seconds + 20)) $PY bench/bench_step.py --out "$OUT" --commit "${BENCH_COMMIT:-unknown}" --no-progress \
    --time-budget-s $((seconds - 30)) ${tag:+--tag $tag} "$@" ${BENCH_ARGS:-} > "$LOGS/$log.log" 2>&1; local rc=$?
  note "$log rc=$rc: $(rows "$tag")"
  [ $rc -eq 0 ] || fail "$log (rc $rc)"
  pack
}

build() {
  note "device session '$SESSION', budget ${BUDGET_S}s, commit ${BENCH_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/summary.txt"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
  if ls wheels/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
      > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || fail "wheel install"
  fi
  timeout 180 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/build.log" 2>&1 || fail "build (see build.log)"
  $PY -c "import adam_mini_kernels as a; print('backends:', a.available_backends())" 2>&1 | tee -a "$OUT/summary.txt"
  $PY -c "import adam_mini; print('official adam-mini', adam_mini.__file__)" >> "$OUT/summary.txt" 2>&1 || note "official adam-mini missing: its parity tests skip (carry wheels/)"
  note "build done"; pack
}

checks() {
  # Tests on the GPU beside the sanitizers (correctness only: nothing is timed here).
  local tests_s=$(( $(left) - 210 )); [ "$tests_s" -gt 300 ] && tests_s=300; [ "$tests_s" -lt 30 ] && tests_s=30
  timeout "$tests_s" $PY -m pytest -q -ra -p no:cacheprovider -n 8 --timeout 240 -k "not 2_pow_31" \
    --junitxml="$LOGS/pytest.xml" ${TESTS:-tests} > "$LOGS/pytest.log" 2>&1 &
  local pytest_pid=$! tool a b rc_a rc_b rc
  for tool in memcheck racecheck; do
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 1 $PY tests/gpu/sanitize_step.py cuda > "$LOGS/sanitize_cuda_$tool.log" 2>&1 & a=$!
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 1 $PY tests/gpu/sanitize_step.py triton > "$LOGS/sanitize_triton_$tool.log" 2>&1 & b=$!
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

  # The >2^31-element buffers, alone.
  local big_s=$(( $(left) - 150 )); [ "$big_s" -gt 120 ] && big_s=120
  if [ "$big_s" -gt 20 ]; then
    timeout "$big_s" $PY -m pytest -q -ra -p no:cacheprovider -k "2_pow_31" ${TESTS:-tests} > "$LOGS/pytest_2pow31.log" 2>&1; rc=$?
    note "pytest 2^31 rc=$rc: $(tail -1 "$LOGS/pytest_2pow31.log")"
    [ $rc -eq 0 ] || fail "pytest 2^31 (rc $rc)"
  else
    note "skipped the 2^31 tests: out of time"
  fi
  pack

  bench $(( $(left) - 25 )) "" --optimizers ours,adamw-foreach,adamw-fused,official
}

variants() {
  bench $(( $(left) - 160 )) variants --no-sweep --optimizers adamw-fused,official,variants,adamw8bit
  # Graph replays at about 1M, 10M (sweep) and 124M parameters beside eager steps and fused AdamW.
  bench $(( $(left) - 15 )) graphs --sets gpt2-124m-fp32 --optimizers ours,adamw-fused,graphs
}

convergence() {
  # The convergence runs (issues 9, 10), rewritten after each; none starts in the last 150 s.
  local conv_s=$(( $(left) - 15 )) rc
  timeout "$conv_s" $PY bench/convergence.py ${CONV_ARGS:---preset gpu} --out "$OUT" --time-budget-s $((conv_s - 150)) \
    > "$LOGS/convergence.log" 2>&1; rc=$?
  note "convergence rc=$rc: $(grep -E ': ([0-9.]+ s|not run|the time budget)' "$LOGS/convergence.log" | tr '\n' ';')"
  [ $rc -eq 0 ] || fail "convergence (rc $rc; 124 = out of time: the JSON holds the runs that finished)"
  pack
}

rest() {
  bench $(( $(left) - 230 )) compile --no-sweep --optimizers compile,adamw-fused
  # The front-end's host time on the GPU machine's cores (seconds; bench/NOTES "Front-end host time").
  timeout 60 $PY bench/host_overhead.py --out "$OUT" --commit "${BENCH_COMMIT:-unknown}" > "$LOGS/host_overhead.log" 2>&1
  local host_rc=$?
  note "host_overhead rc=$host_rc: $(grep -c 'best block' "$LOGS/host_overhead.log") rows"
  [ $host_rc -eq 0 ] || fail "host_overhead (rc $host_rc)"
  local micro_s=$(( $(left) - 15 ))
  if [ "$micro_s" -gt 60 ]; then
    timeout "$micro_s" $PY bench/microbench.py --out "$LOGS/microbench" > "$LOGS/microbench.log" 2>&1; local rc=$?
    note "microbench rc=$rc (results in logs.tgz: microbench/)"
    [ $rc -eq 0 ] || fail "microbench (rc $rc)"
  else
    note "skipped the microbenchmarks: out of time"
  fi
  pack
}

case "$SESSION" in
  checks | variants | convergence | rest) build; "$SESSION" ;;
  *) echo "SESSION must be checks, variants, convergence or rest, got '$SESSION'" >&2; exit 2 ;;
esac
note "done, status $status"
exit $status
