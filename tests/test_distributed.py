"""Multi-process training: two real CPU processes (gloo collectives) on localhost.

Each process owns 2 CPU devices; the train step is jitted over a mesh of all 4 global
devices, each process feeds its half of a fixed global batch, and the losses must equal a
single process's run with 4 local devices on the same batches (the same partitioned program,
only the collectives differ) and, more loosely, a single-device run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ccreid_jax import distributed
from conftest import ROOT

_STEPS = 3
_TIMEOUT_S = 420

_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_compilation_cache_dir", os.path.join({root!r}, ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from ccreid_jax import distributed
initialized = distributed.maybe_initialize(initialization_timeout=120)
import numpy as np
from conftest import tiny_config
from ccreid_jax import memory as memory_lib, models, train
from ccreid_jax.extract import make_mesh

config = tiny_config("unused")
config.train.batch_size = 32
config.model.bn_group_size = 8
model = models.create_model(config.model)
tx = train.make_optimizer(config.optim, config.train.iters)
rng = np.random.default_rng(0)
centroids = rng.normal(size=(6, models.feature_dim(10, 8))).astype(np.float32)
centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
mesh = make_mesh()
state = train.init_train_state(model, tx, config, memory_lib.init_memory(centroids, 16))
state = distributed.replicate(state, mesh)
step = train.make_train_step(model, tx, config, mesh)
rows = distributed.process_slice(32)
losses = []
for i in range({steps}):
  images = rng.integers(0, 256, size=(32, 32, 16, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(8) % 6, 4).astype(np.int32)
  state, metrics = step(state, distributed.global_batch_from_local(images[rows], mesh),
                        distributed.global_batch_from_local(labels[rows], mesh))
  losses.append(float(metrics["loss"]))
# Features of 10 images (not a multiple of anything): each process extracts its share.
from ccreid_jax.extract import make_extract_fn
lmesh = distributed.local_mesh()
images = np.random.default_rng(1).integers(0, 256, size=(10, 32, 16, 3), dtype=np.uint8)
feats = distributed.extract_and_allgather(
    make_extract_fn(model, lmesh), state.variables, images, mesh=lmesh, batch_size=4)
print(json.dumps({{"initialized": initialized, "process": jax.process_index(),
                  "processes": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(), "losses": losses,
                  "memory": float(np.asarray(state.memory.centroids).sum()),
                  "features": np.asarray(feats).tolist()}}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices: int, **extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CCREID_", "JAX_COORD"))}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", **extra)
  return env


def _script() -> list[str]:
  code = _SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), steps=_STEPS)
  return [sys.executable, "-c", code]


# A whole run through the public entry points, in every process: train (or resume) into a
# shared workdir, then evaluate its latest checkpoint.
_TRAIN_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_compilation_cache_dir", os.path.join({root!r}, ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
from ccreid_jax import distributed
distributed.maybe_initialize(initialization_timeout=120)
from conftest import tiny_config
from ccreid_jax import train
config = tiny_config({data_root!r})
config.train.epochs = {epochs}
config.log.ranklist_queries = 2
results = train.train_and_evaluate(config, {workdir!r})
evaluated = train.evaluate(config, {workdir!r}, checkpoint="latest")
print(json.dumps({{"process": jax.process_index(), "processes": jax.process_count(),
                  "results": results, "evaluated": evaluated}}))
"""


def _train_script(data_root: str, workdir: str, epochs: int) -> list[str]:
  code = _TRAIN_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                              data_root=data_root, workdir=workdir, epochs=epochs)
  return [sys.executable, "-c", code]


def _result(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def _run_processes(num_processes: int, local_devices: int,
                   script: list[str] | None = None) -> list[dict]:
  """Starts the processes, waits (bounded), kills any left over, returns their results."""
  script = script or _script()
  port = _free_port()
  procs = []
  try:
    for pid in range(num_processes):
      extra = {}
      if num_processes > 1:
        extra = dict(CCREID_COORDINATOR=f"127.0.0.1:{port}",
                     CCREID_NUM_PROCESSES=str(num_processes), CCREID_PROCESS_ID=str(pid))
      procs.append(subprocess.Popen(script, env=_env(local_devices, **extra),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + _TIMEOUT_S
    outputs = []
    for proc in procs:
      try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"a process did not finish within {_TIMEOUT_S} s")
      assert proc.returncode == 0, err[-4000:]
      outputs.append(_result(out))
    return outputs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_process_slice_and_share():
  assert distributed.process_slice(32, process_index=1, process_count=2) == slice(16, 32)
  assert distributed.process_slice(32) == slice(0, 32)  # this (single) process feeds all.
  with pytest.raises(ValueError, match="multiple of the process count"):
    distributed.process_slice(30, process_index=0, process_count=4)
  shares = [distributed.process_share(10, process_index=p, process_count=3) for p in range(3)]
  assert shares == [(slice(0, 4), 4), (slice(4, 8), 4), (slice(8, 10), 4)]


def test_single_process_helpers_are_plain_device_puts():
  from ccreid_jax.extract import make_mesh

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
def test_two_processes_give_the_same_losses_as_one():
  two = _run_processes(num_processes=2, local_devices=2)
  one = _run_processes(num_processes=1, local_devices=4)[0]
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


def _epoch_records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


@pytest.mark.slow
def test_two_process_run_trains_checkpoints_resumes_and_evaluates(tiny_market, tmp_path):
  """``train_and_evaluate`` + ``evaluate`` in 2 processes x 2 devices on one shared workdir.

  Equals a 1-process, 4-device run epoch for epoch; only process 0 writes the metrics, the
  config and the pictures (one record per epoch, not one per process); the orbax checkpoint
  written by both processes resumes a longer run and evaluates to the logged metrics.
  """
  shared, single = str(tmp_path / "two"), str(tmp_path / "one")
  two = _run_processes(2, 2, _train_script(tiny_market, shared, epochs=2))
  one = _run_processes(1, 4, _train_script(tiny_market, single, epochs=2))[0]
  assert sorted(r["process"] for r in two) == [0, 1] and two[0]["processes"] == 2
  assert two[0]["results"] == two[1]["results"]  # every process computes the same metrics.
  two_records, one_records = _epoch_records(shared), _epoch_records(single)
  assert [r["epoch"] for r in two_records] == [0, 1]  # written once, by process 0.
  for a, b in zip(two_records, one_records):
    assert (a["clusters"], a["outliers"], a["steps"]) == (b["clusters"], b["outliers"], b["steps"])
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-4)
  for name in ("config.json", "curves.png", "ranklist_epoch1.png", "eval_2.json"):
    assert os.path.exists(os.path.join(shared, name)), name
  for r in two:  # the checkpoint both processes wrote evaluates to what training logged.
    assert r["evaluated"]["mAP"] == pytest.approx(two_records[-1]["mAP"], abs=1e-6)
    assert r["evaluated"]["step"] == 2

  # Resume the shared run for one more epoch, again in two processes.
  resumed = _run_processes(2, 2, _train_script(tiny_market, shared, epochs=3))
  records = _epoch_records(shared)
  assert [r["epoch"] for r in records] == [0, 1, 2]
  assert records[:2] == two_records  # the finished epochs are kept, not redone.
  assert records[2]["steps"] == 3 * records[0]["steps"]
  for r in resumed:
    assert r["evaluated"]["step"] == 3
    assert r["evaluated"]["mAP"] == pytest.approx(records[2]["mAP"], abs=1e-6)
