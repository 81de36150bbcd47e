"""Camera-aware training end to end: CA-Jaccard pseudo labels and the proxy loss in the run."""

import numpy as np
import pytest

from ccreid_jax import run as run_lib
from ccreid_jax import train

from conftest import tiny_config

pytestmark = pytest.mark.slow


def _camera_config(data_root):
  config = tiny_config(data_root)
  config.cluster.distance = "ca_jaccard"
  config.cluster.eps = 0.7
  config.camera.enabled = True
  config.camera.num_hard_negatives = 5
  config.camera.min_bucket = 16
  config.train.epochs = 2
  config.train.eval_every = 2
  return config


def test_camera_aware_run_trains_and_resumes_exactly(tiny_market, tmp_path):
  """CA-Jaccard + the proxy loss: the camera term is trained and logged, and a run stopped
  after epoch 0 and resumed gives the same records as the uninterrupted run (the proxies are
  rebuilt from the epoch's own clustering, never read from a checkpoint)."""
  config = _camera_config(tiny_market)
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  resumed = str(tmp_path / "resumed")
  config.train.epochs = 1
  train.train_and_evaluate(config, resumed)
  config.train.epochs = 2
  train.train_and_evaluate(config, resumed)

  a, b = run_lib.Run(straight).epoch_records(), run_lib.Run(resumed).epoch_records()
  assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1]
  for record in a:
    assert record["clusters"] > 0 and record["camera_proxies"] >= record["clusters"]
    assert np.isfinite(record["camera_loss"]) and record["camera_loss"] > 0
    assert np.isfinite(record["loss"])
  keys = ("clusters", "outliers", "camera_proxies", "camera_loss", "loss", "steps")
  for x, y in zip(a, b):
    assert [x[k] for k in keys] == [y[k] for k in keys]
  assert a[-1]["mAP"] == b[-1]["mAP"]
