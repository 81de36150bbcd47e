#!/usr/bin/env bash
# The whole job on the embedded demo dataset: set up .venv, generate the synthetic
# Market-1501-layout dataset, train Cluster Contrast, evaluate, print mAP / CMC.
# Extra arguments go to ccreid_jax.main (e.g. --config.train.epochs=2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
setup_venv
WORKDIR="${WORKDIR:-runs/demo}"
python -m ccreid_jax.data.synthetic --root demo_data
python -m ccreid_jax.main --config configs/demo.py --workdir "$WORKDIR" "$@"
