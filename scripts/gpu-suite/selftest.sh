#!/usr/bin/env bash
# Checks run.sh itself without a GPU or a build: stand-in binaries (each prints a libtest result
# line, records CUDA_CACHE_PATH; the bench writes its two files) in a fake suite folder, then
# `run.sh --sim` must pass, leave at most 8 files in $OUT (what the device tool returns) with
# every step's log inside, and give the steps a writable CUDA_CACHE_PATH outside $OUT.
#
# Usage: scripts/gpu-suite/selftest.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d -t ferry-gpu-selftest.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
BIN=$TMP/bin
OUT=$TMP/out
mkdir -p "$BIN"
echo "commit: selftest" >"$BIN/MANIFEST"
for t in pager-cuda_backend sd-cuda_kernels sd-backend sd-gpu_pipeline; do
  cat >"$BIN/$t" <<STUB
#!/usr/bin/env bash
[ -d "\$CUDA_CACHE_PATH" ] && [ -w "\$CUDA_CACHE_PATH" ] || { echo "no writable CUDA_CACHE_PATH"; exit 1; }
echo "cache \$CUDA_CACHE_PATH" >>"$TMP/caches"
echo "test $t ... ok"
echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
STUB
done
cat >"$BIN/ferry-gpu-bench" <<'STUB'
#!/usr/bin/env bash
while [ $# -gt 0 ]; do
  case $1 in
    --device) dev=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) shift ;;
  esac
done
mkdir -p "$out"
echo '{}' >"$out/gpu-bench-$dev.json"
printf '# bench\n\n## table\n' >"$out/gpu-bench-$dev.md"
echo "scratch" >"$out/extra-scratch-file.txt"
echo "bench done"
STUB
chmod +x "$BIN"/*
OUT=$OUT FERRY_GPU_SUITE_BIN=$BIN bash "$HERE/run.sh" --sim >"$TMP/run.log" 2>&1 || {
  cat "$TMP/run.log"
  echo "selftest: run.sh --sim failed" >&2
  exit 1
}
fail() {
  echo "selftest: $*" >&2
  ls -la "$OUT" >&2
  exit 1
}
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || fail "$n files in \$OUT, the device tool returns 8"
for f in env.txt steps.log summary.md gpu-bench-sim.json gpu-bench-sim.md; do
  [ -f "$OUT/$f" ] || fail "missing $f"
done
for t in pager-cuda_backend sd-cuda_kernels sd-backend sd-gpu_pipeline ferry-gpu-bench; do
  grep -q "^===== $t: PASS" "$OUT/steps.log" || fail "no log of step $t in steps.log"
done
[ "$(wc -l <"$TMP/caches")" -eq 4 ] || fail "not every step saw a CUDA_CACHE_PATH"
case $(head -n1 "$TMP/caches") in
  "cache $OUT"*) fail "the CUDA cache is inside \$OUT" ;;
esac
echo "selftest: run.sh --sim passes, $n files in \$OUT"
