"""What a careless resume or evaluation must not break: another model under --force, another
training set, two runs at once, evaluation with settings that change the model."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ccreid_jax import commands, train
from ccreid_jax import run as run_lib
from ccreid_jax.checkpoint import CheckpointError
from ccreid_jax.data import synthetic

from conftest import copy_run, tiny_config

pytestmark = pytest.mark.slow


def _snapshot(workdir):
  """Every file of the workdir but the checkpoints' and TensorBoard's, with its bytes."""
  out = {}
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_force_with_another_model_fails_before_writing_anything(
  one_epoch_run, tiny_market, tmp_path
):
  workdir = copy_run(one_epoch_run, tmp_path)
  before = _snapshot(workdir)
  config = tiny_config(tiny_market)
  config.train.epochs = 2
  config.model.width = 16  # other shapes: the checkpoint cannot be restored into it
  with pytest.raises(CheckpointError) as info:
    train.train_and_evaluate(config, workdir, force=True)
  message = str(info.value)
  assert "model.width: 8 -> 16" in message and "Nothing was written" in message
  assert "damaged" not in message
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if k != run_lib.LOCK_FILE} == {
    k: v for k, v in before.items() if k != run_lib.LOCK_FILE
  }
  # The run's own config still resumes it.
  run_lib.Run(workdir).check_config(tiny_config(tiny_market), force=False, write=False)


def test_resume_on_another_training_set_is_refused(one_epoch_run, tiny_market, tmp_path):
  workdir = copy_run(one_epoch_run, tmp_path)
  config = tiny_config(tiny_market)
  config.train.epochs = 2
  # Fewer images: refused, even with --force (the saved labels have one entry per image).
  smaller = str(tmp_path / "smaller")
  synthetic.generate_market_dataset(
    smaller,
    num_train_identities=12,
    num_test_identities=8,
    num_cameras=3,
    images_per_camera=(2, 3),
    height=64,
    width=32,
    seed=0,
  )
  config.data.root = smaller
  for force in (False, True):
    with pytest.raises(train.TrainingSetChanged, match="differs from the one this run"):
      train.train_and_evaluate(config, workdir, force=force)
  # The same number of images, one of them another identity: refused without --force.
  renamed = str(tmp_path / "renamed")
  shutil.copytree(tiny_market, renamed)
  folder = os.path.join(renamed, "Market-1501-v15.09.15", "bounding_box_train")
  first = sorted(os.listdir(folder))[0]
  os.rename(os.path.join(folder, first), os.path.join(folder, "9999" + first[4:]))
  config.data.root = renamed
  with pytest.raises(train.TrainingSetChanged, match="--force resumes anyway"):
    train.train_and_evaluate(config, workdir)
  records = run_lib.Run(workdir).epoch_records()
  assert [r["epoch"] for r in records] == [0]  # nothing was trained or logged


_HOLD = """
import sys, time
from ccreid_jax import run as run_lib
with run_lib.Run(sys.argv[1]).lock():
  print("locked", flush=True)
  time.sleep(60)
"""


def test_a_second_run_on_a_held_workdir_is_refused(tmp_path, tiny_market):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, workdir], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(run_lib.WorkdirLocked) as info:
      train.train_and_evaluate(tiny_config(tiny_market), workdir)
    assert f"process {holder.pid} on host" in str(info.value)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  finally:
    holder.kill()
    holder.wait()
  # The holder died without cleaning up: its lock file is no obstacle.
  lock = os.path.join(workdir, run_lib.LOCK_FILE)
  with open(lock) as f:
    assert json.load(f)["pid"] == holder.pid
  with run_lib.Run(workdir).lock():
    with open(lock) as f:
      assert json.load(f)["pid"] == os.getpid()
    with (
      pytest.raises(run_lib.WorkdirLocked, match=f"process {os.getpid()}"),
      run_lib.Run(workdir).lock(),
    ):
      pass


def test_evaluation_uses_the_runs_model_settings(one_epoch_run, tiny_market, caplog):
  config = tiny_config(tiny_market)
  expected = commands.evaluate(config, one_epoch_run, checkpoint="latest")
  changed = tiny_config(tiny_market)
  changed.data.height, changed.data.width = 64, 32  # another input size than the run's
  changed.model.pooling = "avg"
  with caplog.at_level("WARNING", logger="ccreid_jax"):
    results = commands.evaluate(changed, one_epoch_run, checkpoint="latest")
  assert results == expected
  assert "data.height=32" in caplog.text and "model.pooling='gem'" in caplog.text
