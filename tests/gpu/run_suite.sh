#!/usr/bin/env bash
# The GPU correctness suite in one command, for any CUDA machine: build the extension, run every
# test (the `gpu` ones included; `-m gpu` alone would skip the CPU-only checks), then
# compute-sanitizer memcheck and racecheck on both fused backends, synccheck and initcheck on the
# CUDA one. Logs go to $OUT (default /tmp/gpu_suite). Exit status: non-zero if any part failed.
#
#   OUT=$OUT bash tests/gpu/run_suite.sh            # from the repository root (TESTS=... narrows)
#
# For the lent GPU machine (device tool: 10 minutes a command) use tests/gpu/device_session.sh
# (SESSION=checks): the same checks under one deadline, with the benchmark; this script is the
# unhurried version (the tests serially, the sanitizers one at a time), each step still bounded
# (the *_S variables, seconds) so that a hang ends. Each limit is a SIGINT (pytest then prints
# its summary), KILL 20 s later.
#
# On a machine without network (no adam-mini): `wheels/` holding the official adam-mini wheel
# (bench/README.md says how to fetch it) is installed here; the lent GPU machine has transformers
# (5.17), so its tests run there too.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export PATH="$PATH:$CUDA_HOME/bin"  # compute-sanitizer, when it is not on PATH already
unset TRITON_INTERPRET  # the fused backends on the GPU, not Triton's CPU interpreter
PY=${PYTHON:-python3}
BUILD_S=${BUILD_S:-600} TESTS_S=${TESTS_S:-3600} BIG_S=${BIG_S:-900} SANITIZE_S=${SANITIZE_S:-900}
status=0
limit() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

if ls wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed"; status=1; }
fi
if ! limit "$BUILD_S" $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  echo "build failed (build.log); installing without the CUDA extension"; status=1
  ADAM_MINI_SKIP_CUDA_BUILD=1 limit 300 $PY -m pip install -q --no-deps --no-build-isolation -e . \
    > "$OUT/build_without_cuda.log" 2>&1 || echo "install without the CUDA extension failed too"
fi
tail -3 "$OUT/build.log"
backends=$($PY -c "import adam_mini_kernels as a; print('backends:', a.available_backends())" 2>&1 | tail -1)
echo "$backends"
case "$backends" in *"'cuda'"*) ;; *) echo "'cuda' is not in available_backends()"; status=1 ;; esac

limit "$TESTS_S" $PY -m pytest -q -ra -p no:cacheprovider -k "not 2_pow_31" --junitxml="$OUT/pytest.xml" ${TESTS:-tests} \
  > "$OUT/pytest.log" 2>&1 || status=1
tail -15 "$OUT/pytest.log"
limit "$BIG_S" $PY -m pytest -q -ra -p no:cacheprovider -k "2_pow_31" ${TESTS:-tests} > "$OUT/pytest_2pow31.log" 2>&1 \
  || { [ $? -eq 5 ] || status=1; }  # 5: none selected (TESTS narrowed)
tail -3 "$OUT/pytest_2pow31.log"

# A trivial allocation under the sanitizer first: where it refuses the device (gVisor: "Device not
# supported", error 999) that is said, not reported as a failure of our kernels.
# memcheck and initcheck (and the probe) without PyTorch's caching allocator: an access out of a
# tensor's bounds, or a read of its unwritten bytes, inside a cached segment is invisible to them.
echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found'), $(compute-sanitizer --version 2>&1 | tail -1)"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 limit 300 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -c \
  "import torch; x = torch.ones(1024, device='cuda'); torch.cuda.synchronize(); print('sanitizer probe ok', float(x.sum()))" \
  > "$OUT/sanitize_probe.log" 2>&1; probe_rc=$?
if grep -q "sanitizer probe ok" "$OUT/sanitize_probe.log"; then
  for run in memcheck:cuda racecheck:cuda synccheck:cuda initcheck:cuda memcheck:triton racecheck:triton; do
    tool=${run%%:*} backend=${run#*:} nocache=""
    case $tool in memcheck | initcheck) nocache="PYTORCH_NO_CUDA_MEMORY_CACHING=1" ;; esac
    limit "$SANITIZE_S" env $nocache compute-sanitizer --tool "$tool" --error-exitcode 1 $PY tests/gpu/sanitize_step.py "$backend" \
      > "$OUT/sanitize_${backend}_${tool}.log" 2>&1 || status=1
    echo "$backend $tool: $(grep -m1 -E 'Invalid|Program hit|ERROR SUMMARY' "$OUT/sanitize_${backend}_${tool}.log" || tail -1 "$OUT/sanitize_${backend}_${tool}.log")"
  done
elif grep -qiE "device not supported|error 999|cudaErrorUnknown|CUDA error: unknown error" "$OUT/sanitize_probe.log"; then
  echo "compute-sanitizer: UNSUPPORTED HERE ($(grep -m1 -iE 'not supported|999|unknown error' "$OUT/sanitize_probe.log")); sanitizers not run"
elif [ $probe_rc -eq 124 ] || [ $probe_rc -eq 137 ]; then
  echo "compute-sanitizer probe stopped at its 300 s limit (rc $probe_rc): slow here, not broken; sanitizers not run"; status=1
else
  echo "compute-sanitizer probe failed (rc $probe_rc; the tool, not our kernels): $(tail -1 "$OUT/sanitize_probe.log")"; status=1
fi
exit $status
