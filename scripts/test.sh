#!/usr/bin/env bash
# Runs the test suite: creates/uses .venv, installs the test extras, runs pytest.
# Extra arguments are passed to pytest (e.g. `bash scripts/test.sh -k memory`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
export JAX_PLATFORMS=cpu
exec python -m pytest -q -n 2 --dist loadfile "$@"
