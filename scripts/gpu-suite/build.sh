#!/usr/bin/env bash
# Builds the prepared GPU suite into target/gpu-suite/ (run here, where Rust is; the GPU machine
# has none): the GPU test binaries (ferry-pager's cuda_backend, ferry-sd's cuda_kernels), the
# benchmark ferry-gpu-bench, run.sh and a MANIFEST. Release profile, debug info stripped.
# Then prints the folder's size and the device `run` call to use. See docs/perf/gpu-suite.md.
#
# Usage: scripts/gpu-suite/build.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export CARGO_TERM_COLOR=never
# The suite folder is inside the checkout (it travels as a `carry` path), wherever cargo builds.
SUITE=target/gpu-suite
# Size limits: 64 MiB travel per call for the working tree and the carried folder together.
LIMIT_SUITE_MIB=60
LIMIT_TRAVEL_MIB=64

# Executables of the artifacts a `cargo ... --message-format=json` run reports.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"] + "\t" + m["executable"])
'
}

rm -rf "$SUITE"
mkdir -p "$SUITE"
declare -a BUILT=()
# build TARGET NAME CARGO-ARGS...: runs cargo, copies the executable of target TARGET to NAME.
build() {
  local target=$1 name=$2
  shift 2
  echo "== cargo $* --release" >&2
  local exe
  exe=$(cargo "$@" --release --message-format=json | executables \
    | awk -F'\t' -v t="$target" '$1 == t && !n++ {print $2}')
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "build.sh: cargo $* reported no executable for target $target" >&2
    exit 1
  fi
  cp "$exe" "$SUITE/$name"
  strip --strip-debug "$SUITE/$name"
  BUILT+=("$name")
}

build cuda_backend pager-cuda_backend test --no-run -p ferry-pager --test cuda_backend
build cuda_kernels sd-cuda_kernels test --no-run -p ferry-sd --test cuda_kernels
build backend sd-backend test --no-run -p ferry-sd --test backend
build gpu_pipeline sd-gpu_pipeline test --no-run -p ferry-sd --test gpu_pipeline
build ferry-gpu-bench ferry-gpu-bench build -p ferry-sd --bin ferry-gpu-bench
cp scripts/gpu-suite/run.sh "$SUITE/run.sh"
chmod +x "$SUITE/run.sh"
cp scripts/peer-offload/compare.py "$SUITE/peer-compare.py"

{
  echo "ferry GPU suite"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  for b in "${BUILT[@]}"; do
    echo "$b $(stat -c %s "$SUITE/$b") $(sha256sum "$SUITE/$b" | cut -c1-16)"
  done
} >"$SUITE/MANIFEST"

suite_bytes=$(du -sb "$SUITE" | cut -f1)
# What else travels: tracked files plus untracked files git does not ignore.
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo
cat "$SUITE/MANIFEST"
echo
echo "suite folder: $SUITE = $(mib "$suite_bytes") MiB (limit $LIMIT_SUITE_MIB MiB)"
echo "working tree that travels with it: $(mib "$tree_bytes") MiB; together $(mib $((suite_bytes + tree_bytes))) MiB (limit $LIMIT_TRAVEL_MIB MiB)"
if [ "$suite_bytes" -gt $((LIMIT_SUITE_MIB << 20)) ] \
  || [ $((suite_bytes + tree_bytes)) -gt $((LIMIT_TRAVEL_MIB << 20)) ]; then
  echo "build.sh: too large to travel" >&2
  exit 1
fi
cat <<'EOF'

Device call (the `run` tool; one call, about 6-8 minutes on the GPU):
  command:   bash target/gpu-suite/run.sh
  carry:     ["target/gpu-suite"]
  timeout_s: 540
Files come back under the reply's files_at: summary.md, gpu-bench-cuda.md/.json, the logs.
Rehearse here first, on the simulated device:  scripts/gpu-suite/run.sh --sim
EOF
