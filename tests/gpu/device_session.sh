#!/usr/bin/env bash
# The GPU checks of the open issues as ONE call of the lent GPU machine each (device tool: 15
# minutes of device time per task, 10 per command), under a deadline, most needed first. Which
# call: SESSION (a lease holds one; run them in this order over the leases you get):
#
#   checks (default)  build; the step benchmark (SPEC sets and sweep, with the anchors, no
#                     torch.compile rows) alone on the GPU, with a reserved budget; then the test
#                     suite on the GPU (pytest-xdist; tests that need a CPU interpreter skip)
#                     beside the sanitizer workload run once without a sanitizer (Triton's
#                     compiles, a pass/fail line), then compute-sanitizer memcheck and racecheck
#                     of both fused backends, then synccheck and initcheck of the CUDA one if
#                     time allows; the >2^31-element tests alone (~20 GB each) in the time left.
#   variants          build; benchmark rows of issues 6 and 10 on the named sets (bf16 first)
#                     with the anchors (float32/int8 state, stochastic rounding, clipping, 8-bit
#                     AdamW); the CUDA-graph replay rows of issue 7 (1M, 10M, 124M parameters:
#                     those sets only).
#   convergence       build; bench/convergence.py --preset gpu (issues 9, 10), as many runs as
#                     the time allows (its files are rewritten after every run).
#   rest              build; the torch.compile rows beside ours and fused AdamW (about a minute
#                     each); the front-end's host time (bench/host_overhead.py); the microbenchmarks.
#
# Run from the repository root:  SESSION=checks BENCH_COMMIT=<sha> OUT=$OUT bash tests/gpu/device_session.sh
# (device tool: carry ["wheels"] holding the adam-mini 1.1.1 and torchao wheels, timeout_s 600).
# BUDGET_S (default 560) is the whole script's time: each stage's limit is taken from what is left
# of it when the stage starts, and a stage that cannot get its minimum is skipped with a note in
# summary.txt (so a rerun with a small BUDGET_S stays within it). What comes back (at most 8 files):
# summary.txt, logs.tgz (re-packed after every stage, so a killed run still returns what it
# did; each time written outside $OUT, then moved there), and the result files of the benchmark
# (.json/.md/.png) and of the convergence run. Exit status: non-zero if any check failed. BENCH_COMMIT: the commit (the tree there is no git
# checkout). TESTS (default "tests"), BENCH_ARGS (more bench_step.py flags) and CONV_ARGS
# (default "--preset gpu") narrow a rerun. A convergence run split over leases: CONV_ARGS="--preset
# gpu --resume bench/results/convergence_<H100 file>.json bench/results/convergence_<H200 file>.json":
# convergence.py resumes the file of the GPU this lease drew and starts fresh, with a warning (in
# summary.txt), when none is of it (a refusal would waste the lease). A dry run of this script on
# a CPU (tests/test_device_session.py): TESTS=one test file, BENCH_ARGS=--smoke, CONV_ARGS="--preset
# smoke", GRAPH_SETS=sweep-llama-19.6k,gpt2-124m-fp32 (the default graph sets are GPU sizes, unknown
# under --smoke), PYTEST_WORKERS=2, fake nvidia-smi and compute-sanitizer on PATH, PYTHON=a wrapper
# that fakes `-m pip install` and `tests/gpu/sanitize_step.py` (it needs a CUDA device).
#
# Every command runs under `timeout -s INT -k 20`: at its limit it gets SIGINT first (pytest then
# prints its summary, the FAILED lines grepped below, and writes its junitxml; bench_step.py
# reports the rows not run as skipped and still writes its .md and .png; convergence.py's files
# hold the runs finished before), then SIGKILL 20 s later if it is still there.
set -uo pipefail
SESSION=${SESSION:-checks}
OUT=${OUT:-/tmp/device_session}
BUDGET_S=${BUDGET_S:-560}
LOGS=${LOGS:-/tmp/device_session_logs}
PY=${PYTHON:-python3}
# A fresh $LOGS: a second call on a warm machine must not pack the logs of the call before.
rm -rf "${LOGS:?}" "${LOGS%/}.tgz.partial"
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=16
export PATH="$PATH:$CUDA_HOME/bin"  # compute-sanitizer, when it is not on PATH already
unset TRITON_INTERPRET
status=0
left() { echo $((BUDGET_S - SECONDS)); }
note() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/summary.txt"; }
pack() {  # $LOGS into $OUT/logs.tgz: written beside $LOGS, then moved into place, so that a kill
  # mid-tar leaves the last whole logs.tgz and no partial file in $OUT (tar's 1: a log grew while read)
  tar czf "${LOGS%/}.tgz.partial" -C "$LOGS" . 2>/dev/null; [ $? -le 1 ] && mv -f "${LOGS%/}.tgz.partial" "$OUT/logs.tgz"
}
fail() { status=1; note "FAILED: $*"; }
limit() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }  # seconds command...: SIGINT at the limit, KILL 20 s on
rows() {  # tag: the status counts of the rows of bench_step.py's results JSON of that tag in $OUT
  $PY - "$OUT" "$1" 2>&1 <<'EOF' | tail -1
import collections, glob, json, sys
out, tag = sys.argv[1:]
files = [p for p in sorted(glob.glob(f"{out}/*.json")) if "convergence" not in p and p.endswith(f"_{tag}.json" if tag else ".json")]
if not files:
    sys.exit(f"no results JSON for tag {tag or '(none)'} in {out}")
d = json.load(open(files[-1]))
print(files[-1].split("/")[-1], dict(collections.Counter(r["status"] for r in d["rows"])), "complete", d["complete"])
EOF
}
bench() {  # seconds tag bench_step.py-flags...: the benchmark, alone on the GPU, starting no row after the budget
  local seconds=$1 tag=$2; shift 2
  local log="bench${tag:+_$tag}"
  if [ "$seconds" -lt 60 ]; then note "skipped $log: out of time (${seconds}s for it, 60 at least)"; return; fi
  # Wall time ~ seconds: ~10 s of start (imports, copy bandwidth), rows started up to seconds - 30,
  # the last row (~15 s at most but a compile row's minute) and the report. SIGINT at seconds + 20.
  limit $((seconds + 20)) $PY bench/bench_step.py --out "$OUT" --commit "${BENCH_COMMIT:-unknown}" --no-progress \
    --time-budget-s $((seconds - 30)) ${tag:+--tag $tag} "$@" ${BENCH_ARGS:-} > "$LOGS/$log.log" 2>&1; local rc=$?
  note "$log rc=$rc: $(rows "$tag") (budget ${seconds}s)"
  [ $rc -eq 0 ] || fail "$log (rc $rc; 124 = stopped at the limit: the rows not run are skipped in its files)"
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
  # The CUDA build (TORCH_CUDA_ARCH_LIST=9.0: two sources, ~1 minute), else the package without
  # it, so that the Triton and torch backends, the benchmark and the sanitizer of Triton still run.
  if ! limit 180 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/build.log" 2>&1; then
    fail "build of the CUDA extension (build.log): $(grep -m1 -iE 'error' "$LOGS/build.log" | cut -c1-300)"
    ADAM_MINI_SKIP_CUDA_BUILD=1 limit 120 $PY -m pip install -q --no-deps --no-build-isolation -e . \
      > "$LOGS/build_without_cuda.log" 2>&1 || fail "install without the CUDA extension too (build_without_cuda.log)"
  fi
  local backends
  backends=$($PY -c "import adam_mini_kernels as a; print('backends:', a.available_backends())" 2>&1 | tail -1)
  echo "$backends" | tee -a "$OUT/summary.txt"
  case "$backends" in
    *"'cuda'"*) ;;
    *) fail "'cuda' is not in available_backends() after the build: $backends" ;;
  esac
  $PY -c "import adam_mini; print('official adam-mini', adam_mini.__file__)" >> "$OUT/summary.txt" 2>&1 || note "official adam-mini missing: its parity tests skip (carry wheels/)"
  note "build done"; pack
}

SAN_FINDING="Invalid|Program hit|Race reported"  # a finding's line: memcheck, initcheck, synccheck; racecheck
san_refused() {  # log: whether compute-sanitizer refused the device there (gVisor: "Device not supported",
  # then error 999 = cudaErrorUnknown at the first allocation; KINDS.md), told apart from a finding
  # of our kernels (a SAN_FINDING line)
  grep -qiE "device not supported|error 999|cudaErrorUnknown|CUDA error: unknown error" "$1" \
    && ! grep -qE "$SAN_FINDING" "$1"
}
san_first() {  # log: its first error line (SAN_FINDING, "ERROR SUMMARY"), else its last line
  local line; line=$(grep -m1 -E "$SAN_FINDING|ERROR SUMMARY" "$1"); [ -n "$line" ] || line=$(tail -1 "$1")
  echo "$line" | cut -c1-200
}
san_env() {  # tool: memcheck and initcheck without PyTorch's caching allocator (an access out of
  # a tensor's bounds, or a read of its unwritten bytes, inside a cached segment is invisible to them)
  case $1 in memcheck | initcheck) echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1" ;; esac
}
sanitize() {  # cap tool:backend...: those compute-sanitizer runs of sanitize_step.py at once, each
  # limited by the sanitizer stage's end (san_end, seconds of the script) less the 20 s of KILL
  # grace, at most cap; none started under 30 s. Logs packed when they end. Return 1 if the tool
  # refused the device (no more runs then: nothing of ours can be checked here), 2 if out of time.
  local cap=$1 s run tool backend pids="" rc refused=0 log env; shift
  s=$(( san_end - SECONDS - 20 )); [ "$s" -gt "$cap" ] && s=$cap
  if [ "$s" -lt 30 ]; then note "skipped sanitizer $*: out of time (${s}s left of the stage)"; return 2; fi
  for run in "$@"; do
    tool=${run%%:*} backend=${run#*:}
    limit "$s" env $(san_env "$tool") compute-sanitizer --tool "$tool" --error-exitcode 1 $PY tests/gpu/sanitize_step.py "$backend" \
      > "$LOGS/sanitize_${backend}_$tool.log" 2>&1 & pids="$pids $!"
  done
  for run in "$@"; do
    tool=${run%%:*} backend=${run#*:}; log="$LOGS/sanitize_${backend}_$tool.log"
    pids=${pids# }; wait "${pids%% *}"; rc=$?; pids=${pids#* }
    env=$(san_env "$tool"); note "sanitizer $tool $backend rc=$rc (limit ${s}s${env:+, $env}): $(san_first "$log")"
    if san_refused "$log"; then refused=1
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then fail "sanitizer $tool $backend (rc $rc: stopped at its limit, not a finding; see $(basename "$log"))"
    elif [ $rc -ne 0 ]; then fail "sanitizer $tool $backend (rc $rc; $(basename "$log"))"
    fi
  done
  pack
  if [ $refused -eq 1 ]; then
    note "compute-sanitizer: UNSUPPORTED HERE ($(grep -h -m1 -iE 'not supported|999|unknown error' "$LOGS"/sanitize_*.log | head -1 | cut -c1-200)); no more sanitizer runs: not a result of our kernels"
    return 1
  fi
}

unsanitized() {  # sanitize_step.py of both fused backends at once WITHOUT compute-sanitizer, before
  # the sanitizer runs: Triton compiles its kernels here, into its cache, which the memcheck run
  # then reads (a compile inside a sanitized process is slow), and a pass/fail line that needs no
  # sanitizer. Each limited by the sanitizer stage's end (san_end) less 20 s, at most 60 s;
  # skipped under 20 s.
  local s=$(( san_end - SECONDS - 20 )) backend pids="" rc log
  [ "$s" -gt 60 ] && s=60
  if [ "$s" -lt 20 ]; then note "skipped sanitize_step.py without a sanitizer: out of time (${s}s left of the stage)"; return; fi
  for backend in triton cuda; do
    limit "$s" $PY tests/gpu/sanitize_step.py "$backend" > "$LOGS/sanitize_${backend}_unsanitized.log" 2>&1 & pids="$pids $!"
  done
  for backend in triton cuda; do
    log="$LOGS/sanitize_${backend}_unsanitized.log"
    pids=${pids# }; wait "${pids%% *}"; rc=$?; pids=${pids#* }
    note "sanitize_step.py $backend without a sanitizer rc=$rc (limit ${s}s): $(tail -1 "$log" | cut -c1-200)"
    [ $rc -eq 0 ] || fail "sanitize_step.py $backend without a sanitizer (rc $rc; $(basename "$log"))"
  done
  pack
}

pytest_part() {  # name marker: pytest -m marker (the 2^31 tests left out) until tests_end, none
  # started under 30 s; log pytest_<name>.log, its exit status (or "skipped ...") in pytest_<name>.rc.
  # Run in the background: no note or fail here (a subshell's status is lost); pytest_report says.
  local name=$1 marker=$2 s=$(( tests_end - SECONDS ))
  if [ "$s" -lt 30 ]; then echo "skipped: out of time (${s}s left of the limit, 30 at least)" > "$LOGS/pytest_$name.rc"; return; fi
  OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 limit "$s" $PY -m pytest -q -ra -p no:cacheprovider $workers $per_test \
    --durations=30 -m "$marker" -k "not 2_pow_31" --ignore=tests/test_triton_compile.py \
    --junitxml="$LOGS/pytest_$name.xml" ${TESTS:-tests} > "$LOGS/pytest_$name.log" 2>&1
  echo $? > "$LOGS/pytest_$name.rc"
}
pytest_report() {  # name: pytest_part's summary line and FAILED lines in summary.txt (rc 5: none selected)
  local name=$1 log="$LOGS/pytest_$1.log" rc counts
  rc=$(cat "$LOGS/pytest_$name.rc" 2> /dev/null || echo "unknown (no pytest_$name.rc)")
  case $rc in skipped*) note "skipped pytest $name: ${rc#skipped: }"; return ;; esac
  counts=$(grep -E ' in [0-9.]+s' "$log" | tail -1); [ -n "$counts" ] || counts=$(tail -1 "$log")
  note "pytest $name rc=$rc: $counts"
  grep -E "^(FAILED|ERROR)" "$log" | head -40 >> "$OUT/summary.txt"
  if [ "$rc" = 5 ]; then note "no test of pytest $name selected in ${TESTS:-tests}"
  elif [ "$rc" != 0 ]; then fail "pytest $name (rc $rc; 124 = out of time: its summary above holds the tests that ran)"
  fi
}

tests_and_sanitizers() {  # seconds: pytest on the GPU beside the sanitizers, all stopped by then
  local tests_s=$1
  # pytest-timeout's per-test limit and xdist's workers where they are installed (both are on the
  # image; an unknown flag would end pytest at once). Two threads a worker (8 workers, 16 cores),
  # one compile thread each; the Triton compile test is CPU-only (CI runs it).
  local per_test="" workers=""  # (seen by pytest_part: bash's locals are dynamically scoped)
  $PY -c "import pytest_timeout" 2> /dev/null && per_test="--timeout 200" || note "pytest-timeout missing: no per-test limit"
  $PY -c "import xdist" 2> /dev/null && workers="-n ${PYTEST_WORKERS:-8}" || note "pytest-xdist missing: the tests run in one process"
  # The GPU-marked tests first (what only this machine can run), then the rest in what is left of
  # the limit: xdist hands tests out in collection order, so a run stopped at its limit loses its
  # tail, which would be the GPU tests of the files late in the alphabet.
  tests_end=$(( SECONDS + tests_s ))
  { pytest_part gpu gpu; pytest_part rest "not gpu"; } &
  local pytest_pid=$!
  # The sanitizers end with pytest's limit (san_end): sanitize_step.py once without one (Triton's
  # compiles), then memcheck, then racecheck, of both backends at once (100 s each at most), then
  # synccheck and initcheck of the CUDA backend in what is left. No probe: a sanitizer that
  # refuses the device says so in the memcheck logs (san_refused).
  san_end=$tests_end
  note "pytest and sanitizers: limit ${tests_s}s"
  unsanitized
  local san; san=$(command -v compute-sanitizer)
  if [ -z "$san" ]; then
    fail "compute-sanitizer not found (PATH, $CUDA_HOME/bin): no sanitizer run"
  else
    note "compute-sanitizer: $san, $(limit 20 compute-sanitizer --version 2>&1 | grep -v '^ *$' | tr '\n' ' ' | cut -c1-200)"
    local runs
    for runs in "memcheck:cuda memcheck:triton" "racecheck:cuda racecheck:triton" "synccheck:cuda initcheck:cuda"; do
      sanitize 100 $runs || [ $? -eq 2 ] || break  # 1: refused (the rest are not run), 2: skipped
    done
  fi
  pack
  wait $pytest_pid
  pytest_report gpu; pytest_report rest
  pack
}

checks() {
  # Budget (BUDGET_S 560 of the device tool's 600 s per command, 40 s kept for the last pack and
  # the transfer back). After the build (~60 s expected, 180 s at most), in this order, each
  # stage's limit taken from what is left when it starts, a stage that cannot get its minimum
  # skipped with a note (so that a rerun with a small BUDGET_S stays within it):
  #  1. The step benchmark, alone on the GPU: BENCH_S (default 190 s: rows start in its first
  #     160 s), at most all that is left but 110 s (the stages after it), skipped under 60 s. Its
  #     18 named-set rows (3 sets x AdamW foreach and fused, official, ours torch, triton and
  #     cuda; a few s each on 1.1B shapes, plus the first Triton compiles) and 30 sweep rows (~1 s
  #     each) were estimated at 90 to 100 s: 160 s leaves room for slower compiles. It goes first
  #     because issue 3 needs its numbers most and it must run alone; the steps after it shrink
  #     to fit, and the time its rows do not use goes to them (left() is read after it).
  #  2. pytest (PYTEST_WORKERS xdist workers): the tests marked gpu first (-m gpu), then the rest
  #     (-m "not gpu") in what is left of the limit, not started under 30 s; beside them the
  #     sanitizers: sanitize_step.py of both backends once without one (60 s at most: Triton's
  #     kernels are compiled, and cached, outside memcheck), then memcheck, then racecheck, of
  #     both backends at once, then synccheck and initcheck of cuda, 100 s each at most, each
  #     limited by what is left of pytest's limit and skipped under 30 s. In all at most 240 s,
  #     keeping 80 s (a stopped run's 20 s of KILL grace and the 2^31 tests); where that leaves
  #     under 60 s, all but 25 s (the 2^31 tests then get none); skipped under 30 s.
  #  3. The >2^31-element tests alone (two, ~20 GB each): the rest, at most 90 s; skipped under 30 s.
  # Expected: 60 + 190 + 240 + 65 = 555 s. Each limit is a SIGINT, KILL 20 s later.
  local bench_s=$(( $(left) - 110 )); [ "$bench_s" -gt "${BENCH_S:-190}" ] && bench_s=${BENCH_S:-190}
  bench "$bench_s" "" --optimizers ours,adamw-foreach,adamw-fused,official

  # Tests on the GPU beside the sanitizers (correctness only: nothing is timed here).
  local tests_s=$(( $(left) - 80 )) rc; [ "$tests_s" -gt 240 ] && tests_s=240; [ "$tests_s" -lt 60 ] && tests_s=$(( $(left) - 25 ))
  if [ "$tests_s" -lt 30 ]; then
    note "skipped pytest and the sanitizers: out of time (${tests_s}s for them, 30 at least)"
  else
    tests_and_sanitizers "$tests_s"
  fi

  # The >2^31-element buffers, alone.
  local big_s=$(( $(left) - 15 )); [ "$big_s" -gt 90 ] && big_s=90
  if [ "$big_s" -ge 30 ]; then
    limit "$big_s" $PY -m pytest -q -ra -p no:cacheprovider -k "2_pow_31" ${TESTS:-tests} > "$LOGS/pytest_2pow31.log" 2>&1; rc=$?
    note "pytest 2^31 rc=$rc: $(tail -1 "$LOGS/pytest_2pow31.log")"
    if [ $rc -eq 5 ]; then note "no 2^31 test selected in ${TESTS:-tests}"; elif [ $rc -ne 0 ]; then fail "pytest 2^31 (rc $rc)"; fi
  else
    note "skipped the 2^31 tests: out of time (${big_s}s for them, 30 at least)"
  fi
  pack
}

variants() {
  # Variants: all but 120 s, which the graph rows get: 3 small sets x 8 rows (~1 s each, plus the
  # start and the graph captures) and the 40 s by which a stopped benchmark can overrun. Our plain
  # rows (ours) run too: the clipped step's target (issue 6) is a ratio to the unclipped step of
  # the same run. The bfloat16 set first: the stochastic-rounding and float32-state rows apply to it
  # alone, and under the budget the last sets' rows are the ones skipped (bench_step.py runs the
  # sets in the order named).
  bench $(( $(left) - 120 )) variants --no-sweep --sets llama-1.1b-bf16,llama-1.1b-fp32,gpt2-124m-fp32 \
    --optimizers ours,adamw-fused,official,variants,adamw8bit
  # Graph replays at about 1M, 10M (sweep sizes, named) and 124M parameters beside eager steps and
  # fused AdamW: those three sets only, not the whole sweep again.
  bench $(( $(left) - 40 )) graphs --no-sweep --sets "${GRAPH_SETS:-sweep-llama-1.05m,sweep-llama-9.99m,gpt2-124m-fp32}" \
    --optimizers ours,adamw-fused,graphs
}

convergence() {
  # The convergence runs (issues 9, 10), rewritten after each; none starts in the last 150 s
  # (convergence.py's --time-budget-s: all but those), so skipped under 180 s (30 s to start runs in).
  local conv_s=$(( $(left) - 25 )) rc
  if [ "$conv_s" -lt 180 ]; then note "skipped convergence: out of time (${conv_s}s for it, 180 at least)"; pack; return; fi
  limit "$conv_s" $PY bench/convergence.py ${CONV_ARGS:---preset gpu} --out "$OUT" --time-budget-s $((conv_s - 150)) \
    > "$LOGS/convergence.log" 2>&1; rc=$?
  grep -m3 "WARNING" "$LOGS/convergence.log" >> "$OUT/summary.txt"  # e.g. --resume files of another GPU: started fresh
  note "convergence rc=$rc: $(grep -E '^[^|].*: ([0-9.]+ s|not run|the time budget|backend |failed: )' "$LOGS/convergence.log" | tr '\n' ';')"
  [ $rc -eq 0 ] || fail "convergence (rc $rc; 124 = out of time: the JSON holds the runs that finished)"
  pack
}

rest() {
  # The torch.compile rows beside ours (torch, triton, cuda) and fused AdamW in one run (issue 3:
  # side by side): 3 sets x 5 rows, the compile rows about a minute each: all but 220 s (~280 s).
  bench $(( $(left) - 220 )) compile --no-sweep --optimizers ours,compile,adamw-fused
  # The front-end's host time on the GPU machine's cores (seconds; bench/NOTES "Front-end host time"):
  # at most 60 s and all that is left but 25 s; skipped under 20 s.
  local host_s=$(( $(left) - 25 )); [ "$host_s" -gt 60 ] && host_s=60
  if [ "$host_s" -ge 20 ]; then
    limit "$host_s" $PY bench/host_overhead.py --out "$OUT" --commit "${BENCH_COMMIT:-unknown}" > "$LOGS/host_overhead.log" 2>&1
    local host_rc=$?
    note "host_overhead rc=$host_rc (limit ${host_s}s): $(grep -c 'best block' "$LOGS/host_overhead.log") rows"
    [ $host_rc -eq 0 ] || fail "host_overhead (rc $host_rc)"
  else
    note "skipped host_overhead: out of time (${host_s}s for it, 20 at least)"
  fi
  local micro_s=$(( $(left) - 25 ))
  if [ "$micro_s" -gt 60 ]; then
    limit "$micro_s" $PY bench/microbench.py --out "$LOGS/microbench" --time-budget-s $((micro_s - 40)) \
      > "$LOGS/microbench.log" 2>&1; local rc=$?
    note "microbench rc=$rc (results in logs.tgz: microbench/)"
    [ $rc -eq 0 ] || fail "microbench (rc $rc)"
  else
    note "skipped the microbenchmarks: out of time (${micro_s}s for them, 61 at least)"
  fi
  pack
}

case "$SESSION" in
  checks | variants | convergence | rest) build; "$SESSION" ;;
  *) echo "SESSION must be checks, variants, convergence or rest, got '$SESSION'" >&2; exit 2 ;;
esac
note "done, status $status"
exit $status
