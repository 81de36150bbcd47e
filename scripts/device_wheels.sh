#!/usr/bin/env bash
# Downloads into .whl/ the wheels that scripts/device_check.sh installs, for an offline install
# on a GPU machine that cannot reach a package index (CPython 3.12, x86-64 Linux). That machine
# is expected to hold jax with its CUDA plugin, flax, optax, orbax-checkpoint, numpy, scipy,
# scikit-learn, pillow, tqdm, absl-py, PyYAML and protobuf; these are the rest of ccreid_jax's
# imports. Run it on a machine whose pip reaches the package index, then copy the checkout with
# its .whl/ folder (git-ignored) to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  ml_collections==1.1.0 infomap==2.16.0 tensorboardX==2.6.5
ls -l .whl
