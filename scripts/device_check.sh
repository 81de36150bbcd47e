#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one command, most important first: the ResNet-50
# bf16 train step at batch 256, a Market-1501-sized recipe (3 epochs measured, 50 projected),
# the input pipeline alone on the host's cores, then the float32 train step. Needs a CUDA
# machine with jax's CUDA plugin and ccreid_jax's dependencies (or the wheels of
# scripts/device_wheels.sh). Run from the repository root:
#
#   bash scripts/device_check.sh [OUT_DIR]      # OUT_DIR: the output folder, default $OUT,
#                                               # else runs/device_check
#
# With a .whl/ folder (scripts/device_wheels.sh) the missing packages are first installed from
# it into runs/device_site, without any package index. Each benchmark writes its JSON to
# OUT_DIR, all output goes to OUT_DIR/log.txt as it comes, and nvidia-smi dmon logs the GPU's
# load to OUT_DIR/dmon.txt. The recipe's generated dataset, its image cache and its run
# folders go to runs/recipe/ (git-ignored; the dataset and cache are reused by later runs).
# Each benchmark has its own time cap, and none runs past DEADLINE seconds after the start
# (default 560), so the whole check ends within about 10 minutes.
set -uo pipefail
out=${1:-${OUT:-runs/device_check}}
deadline=${DEADLINE:-560}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target runs/device_site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/runs/device_site${PYTHONPATH:+:$PYTHONPATH}
fi
log=$out/log.txt
"$py" - <<'PY' 2>&1 | tee "$log"
import jax, platform
print("jax", jax.__version__, "devices", jax.devices(), "python", platform.python_version())
PY
dmon=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
  nvidia-smi dmon -s um -d 2 -o T >"$out/dmon.txt" 2>&1 &
  dmon=$!
fi

status=0
# capped NAME CAP CMD...: runs CMD for at most CAP seconds and never past the deadline; its
# output goes to the terminal and to the log.
capped() {
  local name=$1 cap=$2 left=$((deadline - SECONDS))
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 30 ]; then
    echo "skipped $name: ${left}s left before the ${deadline}s deadline" | tee -a "$log"
    return
  fi
  echo "== $name (at most ${cap}s, started at ${SECONDS}s)" | tee -a "$log"
  timeout "$cap" "$@" 2>&1 | tee -a "$log"
  status=$((status | PIPESTATUS[0]))
}

# Target: >= 2,500 training images/s (ResNet-50, 256x128, batch 256, bf16, one H100).
capped train_bf16 170 "$py" scripts/bench_train.py --depth 50 --height 256 --width 128 \
  --batch 256 --dtype bfloat16 --steps 20 --out "$out/train_bf16.json"
# Target: the full Market recipe (50 epochs x 200 steps, clustering included) < 30 minutes.
capped recipe_bf16 300 "$py" scripts/bench_recipe.py --config configs/market1501.py \
  --epochs 3 --dtype bfloat16 --workers "$(nproc)" --root runs/recipe/data \
  --workdir "runs/recipe/run-$(date +%s)" --set data.cache_dir=runs/recipe/cache \
  --out "$out/recipe_bf16.json"
# Target: >= 5,000 images/s through the input pipeline at 256x128 on a 16-core host.
capped input 45 "$py" scripts/bench_input.py --height 256 --width 128 --batch 256 \
  --num-images 12936 --batches 40 --out "$out/input.json"
# The default precision, for comparison with the bf16 row.
capped train_fp32 150 "$py" scripts/bench_train.py --depth 50 --height 256 --width 128 \
  --batch 256 --dtype float32 --steps 10 --skip-extract --out "$out/train_fp32.json"
[ -n "$dmon" ] && kill "$dmon" 2>/dev/null
echo "done at ${SECONDS}s, status $status" | tee -a "$log"
exit "$status"
