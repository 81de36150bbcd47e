#!/usr/bin/env bash
# Runs the test suite: creates/uses .venv, installs the test extras (and the CPU build of
# PyTorch 2.13.0 for the parity tests), checks the style and the types (ruff, mypy: the
# configuration is in pyproject.toml), runs pytest. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -k memory`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
setup_venv test
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU) for the parity tests"
  # --no-compile: byte-compiling torch's sources took 34 of the install's 46 s on 2 cores;
  # only the two pytest workers import torch, which then costs them ~3 s more each.
  python -m pip install --quiet --no-compile torch==2.13.0 \
    || echo "[setup] WARNING: torch==2.13.0 could not be installed; the tests that need it" \
            "will be skipped (with CI set, as on CI services, each fails instead: tests/conftest.py)"
fi
if ! python -c "import jax2onnx" 2>/dev/null; then
  # The ONNX export's converter, without its pins (they would downgrade orbax-checkpoint).
  echo "[setup] installing jax2onnx==0.17.1 (--no-deps) for the ONNX export tests"
  python -m pip install --quiet --no-deps jax2onnx==0.17.1 \
    || echo "[setup] WARNING: jax2onnx could not be installed; the ONNX export test will be skipped"
fi
# Style and types before the tests (seconds; settings in pyproject.toml): a finding fails.
echo "[check] ruff check, ruff format --check, mypy"
python -m ruff check ccreid_jax tests scripts \
  || { echo "[check] fix the findings above (ruff check --fix ... fixes the safe ones)"; exit 1; }
python -m ruff format --check ccreid_jax tests scripts \
  || { echo "[check] reformat with: ruff format ccreid_jax tests scripts"; exit 1; }
python -m mypy \
  || { echo "[check] fix the type errors above (mypy checks the package ccreid_jax)"; exit 1; }
export JAX_PLATFORMS=cpu
exec python -m pytest -q -n 2 --dist loadfile "$@"
