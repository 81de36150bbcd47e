"""Multi-process training: two real CPU processes (gloo collectives) on localhost.

Each process owns 2 CPU devices; the train step is jitted over a mesh of all 4 global
devices, each process feeds its half of a fixed global batch, and the losses must equal a
single process's run with 4 local devices on the same batches (the same partitioned program,
only the collectives differ) and, within float tolerance, a single-device run (ghost batch
norm keeps the statistics independent of the device count).
"""

import os
import sys

import numpy as np
import pytest

from ccreid_jax import distributed

from conftest import ROOT
from multiprocess import run_processes

_STEPS = 3

_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
from ccreid_jax import distributed
initialized = distributed.maybe_initialize(initialization_timeout=120)
import numpy as np
from conftest import tiny_config  # also sets up the compilation cache (not for 2 processes)
from ccreid_jax import memory as memory_lib, models, train
from ccreid_jax import state as state_lib
from ccreid_jax.distributed import make_mesh

config = tiny_config("unused")
config.train.batch_size = 32
config.model.bn_group_size = 8
model = models.create_model(config.model)
tx = state_lib.make_optimizer(config.optim, config.train.iters)
rng = np.random.default_rng(0)
centroids = rng.normal(size=(6, models.feature_dim(10, 8))).astype(np.float32)
centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
mesh = make_mesh()
state = state_lib.create_train_state(model, config, tx=tx,
                                     memory=memory_lib.init_memory(centroids, 16))
state = distributed.replicate(state, mesh)
step = train.make_train_step(config, mesh)
rows = distributed.process_slice(32)
losses = []
for i in range({steps}):
  images = rng.integers(0, 256, size=(32, 32, 16, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(8) % 6, 4).astype(np.int32)
  state, metrics = step(state, distributed.global_batch_from_local(images[rows], mesh),
                        distributed.global_batch_from_local(labels[rows], mesh))
  losses.append(float(metrics["loss"]))
# Features of 10 images (not a multiple of anything): each process extracts its share.
from ccreid_jax.extract import extract_and_allgather, make_extract_fn
lmesh = distributed.local_mesh()
images = np.random.default_rng(1).integers(0, 256, size=(10, 32, 16, 3), dtype=np.uint8)
feats = extract_and_allgather(
    make_extract_fn(model, lmesh), state.variables, images, mesh=lmesh, batch_size=4)
print(json.dumps({{"initialized": initialized, "process": jax.process_index(),
                  "processes": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(), "losses": losses,
                  "memory": float(np.asarray(state.memory.centroids).sum()),
                  "features": np.asarray(feats).tolist()}}))
"""


def _script() -> list[str]:
  code = _SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), steps=_STEPS)
  return [sys.executable, "-c", code]


def test_process_slice_and_share():
  assert distributed.process_slice(32, process_index=1, process_count=2) == slice(16, 32)
  assert distributed.process_slice(32) == slice(0, 32)  # this (single) process feeds all.
  with pytest.raises(ValueError, match="multiple of the process count"):
    distributed.process_slice(30, process_index=0, process_count=4)
  shares = [distributed.process_share(10, process_index=p, process_count=3) for p in range(3)]
  assert shares == [(slice(0, 4), 4), (slice(4, 8), 4), (slice(8, 10), 4)]


def test_single_process_helpers_are_plain_device_puts():
  from ccreid_jax.distributed import make_mesh

  mesh = make_mesh()
  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  np.testing.assert_array_equal(np.asarray(distributed.global_batch_from_local(x, mesh)), x)
  np.testing.assert_array_equal(distributed.allgather_features(x), x)
  replicated = distributed.replicate({"a": x}, mesh)
  np.testing.assert_array_equal(np.asarray(replicated["a"]), x)


def test_maybe_initialize_needs_all_or_none_of_its_variables():
  assert distributed.maybe_initialize(environ={}) is False
  with pytest.raises(ValueError, match="or none"):
    distributed.maybe_initialize(environ={"CCREID_COORDINATOR": "127.0.0.1:1234"})
  assert distributed._cluster_env_present({"SLURM_JOB_ID": "1"}) is None  # not a full step.
  assert distributed._cluster_env_present({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "jax"


@pytest.mark.slow
def test_one_device_four_devices_and_two_processes_give_the_same_losses():
  two = run_processes(2, 2, _script())
  one = run_processes(1, 4, _script())[0]
  single = run_processes(1, 1, _script())[0]
  # Every process ran every step and extracted every image (10 rows of 64 features), so the
  # comparisons below are between whole lists.
  for r in two + [one, single]:
    assert len(r["losses"]) == _STEPS and np.shape(r["features"]) == (10, 64)
  # 1 vs 4 simulated devices: the same sums in another order (per-device partial sums).
  assert (single["processes"], single["devices"]) == (1, 1)
  np.testing.assert_allclose(one["losses"], single["losses"], rtol=1e-4, atol=1e-5)
  assert one["memory"] == pytest.approx(single["memory"], rel=1e-4)
  np.testing.assert_allclose(one["features"], single["features"], atol=1e-5)
  assert sorted(r["process"] for r in two) == [0, 1]
  for r in two:
    assert (r["initialized"], r["processes"], r["devices"], r["local_devices"]) == (True, 2, 4, 2)
  assert (one["initialized"], one["processes"], one["devices"]) == (False, 1, 4)
  # Both processes read the same replicated loss and memory.
  assert two[0]["losses"] == two[1]["losses"] and two[0]["memory"] == two[1]["memory"]
  np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=0, atol=1e-5)
  assert two[0]["memory"] == pytest.approx(one["memory"], abs=1e-4)
  # The losses change from step to step: the parameters and memory really are updated.
  assert len(set(one["losses"])) == _STEPS
  # Per-process extraction + all-gather gives every process all features, in order.
  np.testing.assert_array_equal(two[0]["features"], two[1]["features"])
  np.testing.assert_allclose(two[0]["features"], one["features"], atol=1e-5)
