#!/usr/bin/env bash
# The accelerator checks of docs/benchmarks.md in one command (an estimate, not yet
# measured: 6-8 minutes on one H100/H200): the ResNet-50 bf16 train step at batch 256,
# then a Market-1501-sized recipe (3 epochs measured, 50 projected). Run from the
# repository root on the GPU machine:
#
#   bash scripts/device_check.sh [OUT_DIR]      # default: $OUT, else ./device_check
#
# With a .whl/ folder (scripts/device_wheels.sh) the missing packages are installed from it
# first, without any index. Each benchmark writes its JSON and log to OUT_DIR as it goes.
# The two benchmarks are capped at 210 s and 360 s, so the whole script ends inside a
# 10-minute call even when both run out of time.
set -uo pipefail
out=${1:-${OUT:-device_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ccreid_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/ccreid_site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" - <<'PY' 2>&1 | tee "$out/devices.txt"
import jax, platform
print("jax", jax.__version__, "devices", jax.devices(), "python", platform.python_version())
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv | tee -a "$out/devices.txt"

status=0
# Target: >= 2,500 training images/s (ResNet-50, 256x128, batch 256, bf16, one H100).
timeout 210 "$py" scripts/bench_train.py --depth 50 --height 256 --width 128 --batch 256 \
  --dtype bfloat16 --steps 20 --out "$out/train_bf16.json" 2>&1 | tee "$out/train_bf16.log"
status=$((status | PIPESTATUS[0]))
# Target: the full Market recipe (50 epochs x 200 steps, clustering included) < 30 minutes.
timeout 360 "$py" scripts/bench_recipe.py --config configs/market1501.py --epochs 3 \
  --dtype bfloat16 --workers "$(nproc)" --root /tmp/ccreid_recipe/data \
  --workdir "/tmp/ccreid_recipe/run-$(date +%s)" --set data.cache_dir=/tmp/ccreid_recipe/cache \
  --out "$out/recipe_bf16.json" 2>&1 | tee "$out/recipe_bf16.log"
status=$((status | PIPESTATUS[0]))
exit "$status"
