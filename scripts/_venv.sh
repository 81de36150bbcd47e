# Sourced by scripts/*.sh, which then call `setup_venv [extras]`: creates .venv at the repo
# root if missing and installs the package with the given extras (e.g. "test"). Idempotent
# and quick when up to date. A function, so that the sourcing script's own arguments (e.g.
# demo.sh's --config.seed=2) are never read as extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

setup_venv() {
  local extras="${1:-}" spec="." stamp py="${PYTHON:-python3}"
  cd "$ROOT"
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($py --version)"
    "$py" -m venv .venv
  fi
  [ -n "$extras" ] && spec=".[$extras]"
  stamp=".venv/.installed-${extras:-base}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing ccreid_jax${extras:+[$extras]} into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$spec"
    touch "$stamp"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
}
