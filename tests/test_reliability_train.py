"""Training through faults, in process: degenerate clusterings, a NaN loss, damaged checkpoints."""

import logging
import math
import os
import shutil
import time

import numpy as np
import pytest

from ccreid_jax import clustering, commands, train
from ccreid_jax import run as run_lib
from ccreid_jax.checkpoint import Checkpointer, CheckpointError
from ccreid_jax.data.datasets import load_dataset

from conftest import copy_run, tiny_config

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# Degenerate clusterings.
# ---------------------------------------------------------------------------------------


def _no_cluster(n, epoch, real):
  return np.full(n, -1) if epoch == 0 else real()


def _fewer_than_p(n, epoch, real):
  labels = np.arange(n) % 3  # 3 clusters < P = 32 / 4 = 8 identities per batch
  labels[::7] = -1
  return labels


def _one_cluster(n, epoch, real):
  return np.zeros(n, np.int64)


@pytest.mark.parametrize("make_labels", [_no_cluster, _fewer_than_p, _one_cluster])
def test_degenerate_clusterings_complete(tiny_market, tmp_path, monkeypatch, make_labels, caplog):
  config = tiny_config(tiny_market)
  config.train.eval_initial = True
  real_dbscan = clustering.dbscan_labels
  calls = []

  def dbscan_labels(distance, **kwargs):
    epoch = len(calls)  # one clustering per epoch
    calls.append(epoch)
    return make_labels(distance.shape[0], epoch, lambda: real_dbscan(distance, **kwargs))

  monkeypatch.setattr(clustering, "dbscan_labels", dbscan_labels)
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    results = train.train_and_evaluate(config, workdir)
  num_train = len(load_dataset(config.data.name, config.data.root).train)
  # An epoch with one cluster or none is warned about, once per epoch (issue 38, item 10).
  warned = {
    "no cluster": caplog.text.count("the clustering found no cluster"),
    "one cluster": caplog.text.count("in one cluster; the loss of one class is 0"),
  }
  want = {
    _no_cluster: {"no cluster": 1, "one cluster": 0},
    _fewer_than_p: {"no cluster": 0, "one cluster": 0},
    _one_cluster: {"no cluster": 0, "one cluster": 2},
  }[make_labels]
  assert warned == want
  records = run_lib.Run(workdir).epoch_records()
  assert [r["epoch"] for r in records] == [0, 1] and calls == [0, 1]
  steps = 0
  for record in records:
    if record["clusters"] == 0:  # skipped: nothing trained, the loss says so
      assert math.isnan(record["loss"]) and record["steps"] == steps
      assert record["outliers"] == num_train
    else:
      steps += config.train.iters
      assert np.isfinite(record["loss"]) and record["steps"] == steps
    assert 0.0 <= record["mAP"] <= 1.0
  # The results are the last evaluation and the best one (ties: any epoch with the best mAP).
  assert results["last"]["epoch"] == 1 and results["last"]["mAP"] == records[1]["mAP"]
  best = max(r["mAP"] for r in records)
  assert results["mAP"] == pytest.approx(best, abs=1e-6)
  assert records[results["epoch"]]["mAP"] == pytest.approx(best, abs=1e-6)
  initial = [r for r in run_lib.Run(workdir).metrics_lines()[0] if r["kind"] == "initial"]
  assert len(initial) == 1
  if make_labels is _no_cluster:
    assert records[0]["clusters"] == 0 and records[1]["clusters"] > 0
    # Epoch 0 trained nothing: its model is the initial one, batch statistics included.
    assert records[0]["mAP"] == initial[0]["mAP"]
  if make_labels is _fewer_than_p:
    assert [r["clusters"] for r in records] == [3, 3]
    # Samples 0, 7, 14, ... are the outliers: ceil(N / 7) of them.
    assert [r["outliers"] for r in records] == [-(-num_train // 7)] * 2
  if make_labels is _one_cluster:
    assert [(r["clusters"], r["outliers"]) for r in records] == [(1, 0), (1, 0)]
    assert [r["loss"] for r in records] == [0.0, 0.0]  # one class: cross-entropy is 0


# ---------------------------------------------------------------------------------------
# A non-finite loss.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_run(tiny_market, tmp_path_factory):
  """A 3-epoch run whose loss turns NaN in epoch 1 (NaN centroids from a blown-up feature)."""
  config = tiny_config(tiny_market)
  config.train.epochs = 3
  real_centroids = clustering.cluster_centroids
  calls = []

  def centroids(features, labels):
    calls.append(1)
    out = real_centroids(features, labels)
    return out if len(calls) == 1 else np.full_like(out, np.nan)

  workdir = str(tmp_path_factory.mktemp("nan") / "run")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(clustering, "cluster_centroids", centroids)
    with pytest.raises(FloatingPointError) as info:
      train.train_and_evaluate(config, workdir)
  folder = os.path.join(workdir, "checkpoints")
  committed_at_raise = sorted(os.listdir(folder))
  return config, workdir, info.value, committed_at_raise


def test_nan_loss_stops_the_run(nan_run):
  _, workdir, error, _ = nan_run
  assert "non-finite loss at epoch 1" in str(error)
  assert os.path.join(workdir, "checkpoints") in str(error)
  assert [r["epoch"] for r in run_lib.Run(workdir).epoch_records()] == [0]


def test_last_good_checkpoint_is_committed_when_the_error_is_raised(nan_run):
  assert nan_run[3] == ["1"]


def test_nan_loss_leaves_the_last_good_checkpoint_restorable(nan_run):
  config, workdir, _, _ = nan_run
  folder = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + 60  # in process, the in-flight save still completes
  while sorted(os.listdir(folder)) != ["1"] and time.monotonic() < deadline:
    time.sleep(0.05)
  ckpt = Checkpointer(folder, read_only=True)
  assert ckpt.latest() == 1
  evaluated = commands.evaluate(config, workdir, checkpoint="latest")
  assert evaluated["checkpoint"] == 1 and evaluated["epoch"] == 0
  # Resuming, the fault gone, continues with epoch 1.
  config.train.epochs = 2
  train.train_and_evaluate(config, workdir)
  assert [r["epoch"] for r in run_lib.Run(workdir).epoch_records()] == [0, 1]


# ---------------------------------------------------------------------------------------
# Damaged or half-written checkpoints.
# ---------------------------------------------------------------------------------------


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_truncated_checkpoint_names_the_step_and_the_way_out(one_epoch_run, tiny_market, tmp_path):
  workdir = copy_run(one_epoch_run, tmp_path)
  victim = _largest_file(os.path.join(workdir, "checkpoints", "1", "state"))
  with open(victim, "rb") as f:
    data = f.read()
  with open(victim, "wb") as f:
    f.write(data[: len(data) // 2])
  config = tiny_config(tiny_market)
  config.train.epochs = 2
  with pytest.raises(CheckpointError) as info:
    train.train_and_evaluate(config, workdir)
  message = str(info.value)
  assert "Checkpoint 1" in message and os.path.join(workdir, "checkpoints") in message
  assert "new --workdir" in message and "move" in message
  with pytest.raises(CheckpointError, match="Checkpoint 1"):
    commands.evaluate(config, workdir, checkpoint="latest")


def test_damaged_checkpoint_metadata(one_epoch_run, tiny_market, tmp_path):
  workdir = copy_run(one_epoch_run, tmp_path)
  with open(os.path.join(workdir, "checkpoints", "1", "meta", "metadata"), "w") as f:
    f.write('{"epoch": ')
  config = tiny_config(tiny_market)
  config.train.epochs = 2
  with pytest.raises(CheckpointError, match="Checkpoint 1 .* cannot be read"):
    train.train_and_evaluate(config, workdir)


def test_checkpoint_error_suggests_another_kept_step(one_epoch_run, tmp_path):
  workdir = copy_run(one_epoch_run, tmp_path)
  folder = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(folder, "1"), os.path.join(folder, "2"))
  with open(os.path.join(folder, "2", "meta", "metadata"), "w") as f:
    f.write("")
  ckpt = Checkpointer(folder, read_only=True)
  with pytest.raises(CheckpointError, match=r"--checkpoint=1 \(kept: \[1\]\)"):
    ckpt.read_meta(2)
  assert ckpt.best() == 1  # the unreadable checkpoint is left out, with a warning


def test_leftover_temporary_checkpoint_does_not_break_the_restart(
  one_epoch_run, tiny_market, tmp_path
):
  """A run killed while orbax wrote checkpoint 2 leaves ``2.orbax-checkpoint-tmp-*`` behind."""
  workdir = copy_run(one_epoch_run, tmp_path)
  folder = os.path.join(workdir, "checkpoints")
  partial = os.path.join(folder, "2.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(os.path.join(folder, "1"), partial)
  for d, _, names in os.walk(partial):
    for name in names:
      path = os.path.join(d, name)
      if name == "commit_success.txt" or name.startswith("_"):
        os.remove(path)
      else:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  assert Checkpointer(folder, read_only=True).latest() == 1
  config = tiny_config(tiny_market)
  config.train.epochs = 2
  train.train_and_evaluate(config, workdir)
  assert Checkpointer(folder, read_only=True).latest() == 2
  assert [r["epoch"] for r in run_lib.Run(workdir).epoch_records()] == [0, 1]
  assert commands.evaluate(config, workdir, checkpoint="latest")["epoch"] == 1
