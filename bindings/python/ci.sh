#!/usr/bin/env bash
# CI for the Python package (bindings/python), from a clean clone, no GPU: a CPU venv with torch,
# diffusers and transformers (../shared/tools/torch-cpu-venv.sh), maturin, then
# `pip install ./bindings/python` (an abi3 wheel built by maturin) and pytest.
# Env: FERRY_PY_VENV (venv dir, default target/py-venv; reused if present),
#      FERRY_TOOLS (dir of torch-cpu-venv.sh, default $REPO/../shared/tools).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${FERRY_PY_VENV:-$repo/target/py-venv}
tools=${FERRY_TOOLS:-$repo/../shared/tools}
# Share compiled dependencies with the root workspace's builds.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
export CARGO_TERM_COLOR=never

echo "== python: fmt and clippy (bindings/python is its own Cargo workspace)"
(cd "$here" && cargo fmt -- --check && cargo clippy --all-targets -- -D warnings)

if [ ! -x "$venv/bin/python" ]; then
  echo "== python: venv with CPU torch + diffusers ($venv)"
  bash "$tools/torch-cpu-venv.sh" "$venv"
fi
"$venv/bin/python" -m pip install -q "maturin>=1.5,<2" pytest

echo "== python: pip install ./bindings/python"
(cd "$repo" && "$venv/bin/python" -m pip install -q --force-reinstall --no-deps ./bindings/python)

echo "== python: pytest (simulated device, CPU tensors)"
(cd "$here" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests)
