#!/usr/bin/env bash
# Runs the prepared GPU suite that scripts/gpu-suite/build.sh put in target/gpu-suite/.
#
#   on the GPU machine:  bash target/gpu-suite/run.sh          (writes under $OUT)
#   rehearsal here:      scripts/gpu-suite/run.sh --sim        (or FERRY_GPU_SUITE_SIM=1)
#
# Steps: the GPU and driver; ferry-pager's CUDA backend tests and ferry-sd's kernel tests with
# --include-ignored (the GPU tests are #[ignore]d; in --sim mode they stay ignored and are reported
# as such); then ferry-gpu-bench on the GPU (--sim: on the simulated device). Each step has a
# timeout and a failing step does not stop the others; a summary comes last. Needs no Rust
# toolchain and no network. Output: $OUT (else a fresh temporary folder), at most 6 files (the
# device tool returns at most 8): env.txt, steps.log (every step's full log, one after another),
# gpu-bench-<device>.{json,md}, summary.md, and peer-offload.md (diffusers' offload modes
# compared by scripts/peer-offload/compare.py; GPU only, where python3 has torch and diffusers). The steps work in a scratch folder outside $OUT,
# which also holds the CUDA JIT cache (CUDA_CACHE_PATH), so PTX is compiled once per run.
#
# Environment: OUT, FERRY_GPU_SUITE_SIM=1, FERRY_GPU_SUITE_BIN (folder of the binaries),
# T_PAGER / T_KERNELS / T_BACKEND / T_PIPE / T_BENCH / T_PEER (timeouts in seconds),
# FERRY_GPU_SUITE_PYTHON (python for the peer comparison, default python3), BENCH_ARGS (extra ferry-gpu-bench args).
set -u
SIM=${FERRY_GPU_SUITE_SIM:-0}
for a in "$@"; do
  case $a in
    --sim) SIM=1 ;;
    *) echo "run.sh: unknown argument $a (only --sim)" >&2; exit 2 ;;
  esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -n "${FERRY_GPU_SUITE_BIN:-}" ]; then
  BIN=$FERRY_GPU_SUITE_BIN
elif [ -f "$HERE/MANIFEST" ]; then
  BIN=$HERE # run from the built folder
else
  BIN=$(cd "$HERE/../.." && pwd)/target/gpu-suite # run from scripts/gpu-suite in a checkout
fi
if [ ! -f "$BIN/MANIFEST" ]; then
  echo "run.sh: no suite in $BIN; run scripts/gpu-suite/build.sh first" >&2
  exit 2
fi
# A copy may lose the executable bits.
chmod +x "$BIN"/pager-cuda_backend "$BIN"/sd-cuda_kernels "$BIN"/sd-backend "$BIN"/sd-gpu_pipeline \
  "$BIN"/ferry-gpu-bench 2>/dev/null
OUT=${OUT:-$(mktemp -d -t ferry-gpu-suite.XXXXXX)}
mkdir -p "$OUT"
# Step logs and bench output are written here, and only the files named above go to $OUT.
WORK=$(mktemp -d -t ferry-gpu-suite-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# The driver's JIT cache: the default (~/.nv) may be unwritable or absent on the GPU machine,
# and without a cache every process compiles every module again.
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$WORK/cuda-cache}
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-1073741824}
mkdir -p "$CUDA_CACHE_PATH"
export RUST_BACKTRACE=1
T_PAGER=${T_PAGER:-60}
T_KERNELS=${T_KERNELS:-120}
T_BACKEND=${T_BACKEND:-60}
T_PIPE=${T_PIPE:-60}
T_BENCH=${T_BENCH:-180}
# The test binaries read the committed fixtures from this copy of the tree.
export FERRY_FIXTURES=${FERRY_FIXTURES:-$PWD/tests/fixtures/models}
START=$(date +%s)
declare -a SUMMARY=()
FAILED=0

# step NAME TIMEOUT CMD...: runs CMD with its output in $WORK/NAME.log (appended to
# $OUT/steps.log afterwards), records the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local log=$WORK/$name.log t0 rc
  echo
  echo "=== $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0)) verdict
  case $rc in
    0) verdict=PASS ;;
    124 | 137) verdict="TIMEOUT (${limit}s)" ;;
    *) verdict="FAIL (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  # Test binaries: the libtest result line and any failure names; otherwise the log's tail.
  local results
  results=$(grep -E '^test result:' "$log" | tail -n1)
  if [ -n "$results" ]; then
    grep -E '^test [^ ]+ \.\.\. (FAILED|ignored)' "$log" | head -n 30
    grep -E -A1 'panicked at' "$log" | grep -v '^--$' | head -n 30
    echo "$results"
  else
    tail -n 5 "$log"
  fi
  echo "--- $name: $verdict in ${secs}s"
  {
    echo "===== $name: $verdict in ${secs}s: $*"
    cat "$log"
    echo
  } >>"$OUT/steps.log"
  SUMMARY+=("| $name | $verdict | ${secs} s | ${results:-} |")
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm); $(nproc) CPUs"
  echo "mode: $([ "$SIM" = 1 ] && echo 'simulated device (--sim): GPU tests stay ignored' || echo 'GPU')"
  echo
  cat "$BIN/MANIFEST"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$SIM" = 1 ]; then
  TEST_ARGS=(--test-threads=1)
  DEVICE=sim
else
  TEST_ARGS=(--include-ignored --test-threads=1)
  DEVICE=cuda
fi
step pager-cuda_backend "$T_PAGER" "$BIN/pager-cuda_backend" "${TEST_ARGS[@]}"
step sd-cuda_kernels "$T_KERNELS" "$BIN/sd-cuda_kernels" "${TEST_ARGS[@]}"
step sd-backend "$T_BACKEND" "$BIN/sd-backend" "${TEST_ARGS[@]}"
step sd-gpu_pipeline "$T_PIPE" "$BIN/sd-gpu_pipeline" "${TEST_ARGS[@]}"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words
step ferry-gpu-bench "$T_BENCH" "$BIN/ferry-gpu-bench" --device "$DEVICE" --out "$WORK/bench" ${BENCH_ARGS:-}
for f in "$WORK/bench/gpu-bench-$DEVICE.json" "$WORK/bench/gpu-bench-$DEVICE.md"; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
# diffusers' own offloading against each other (and ferry.torch where its wheel is installed) on
# the tiny sd15 fixture: GPU only, and only where python3 has torch and diffusers.
PY=${FERRY_GPU_SUITE_PYTHON:-python3}
if [ "$SIM" != 1 ] && [ -f "$BIN/peer-compare.py" ] && "$PY" -c "import torch, diffusers" 2>/dev/null; then
  step peer-offload "${T_PEER:-180}" "$PY" "$BIN/peer-compare.py" --model "$FERRY_FIXTURES/sd15" \
    --device cuda --steps 4 --size 256 --out "$WORK/peer"
  [ -f "$WORK/peer/results.md" ] && cp "$WORK/peer/results.md" "$OUT/peer-offload.md"
fi

TOTAL=$(($(date +%s) - START))
{
  echo "# Ferry GPU suite: $([ "$SIM" = 1 ] && echo 'SIMULATED device (rehearsal)' || sed -n 's/^gpu: //p' "$OUT/env.txt" | grep . || echo 'GPU (nvidia-smi gave no name)')"
  echo
  echo "$(date -u +%Y-%m-%d), $(grep -m1 '^commit:' "$BIN/MANIFEST"), ${TOTAL} s in all, $FAILED step(s) failed"
  echo
  echo "| step | verdict | time | tests |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.md"
if [ -f "$OUT/gpu-bench-$DEVICE.md" ]; then
  echo
  # The bench's tables last, so they are in the tail the device tool returns.
  sed -n '/^## /,$p' "$OUT/gpu-bench-$DEVICE.md"
fi
echo
cat "$OUT/summary.md"
echo "output: $OUT"
# The device tool returns at most 8 files from $OUT; more means one is lost silently.
NFILES=$(find "$OUT" -type f | wc -l)
if [ "$NFILES" -gt 8 ]; then
  echo "run.sh: $OUT holds $NFILES files; the device tool returns only 8" >&2
  FAILED=$((FAILED + 1))
fi
[ "$FAILED" -eq 0 ]
