"""The researcher's workflow end to end: pictures, TensorBoard, direct transfer, export,
cross-dataset."""

import os

import numpy as np
import pytest
from PIL import Image

from ccreid_jax import commands, feature_files, train
from ccreid_jax import run as run_lib
from ccreid_jax import tensorboard as tb
from ccreid_jax.data import synthetic

from conftest import tiny_config


@pytest.mark.slow
def test_workflow_outputs(tiny_market, tmp_path):
  config = tiny_config(tiny_market)
  config.log.ranklist_queries = 3
  config.log.ranklist_topk = 4
  config.train.eval_initial = True
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  names = os.listdir(workdir)
  for name in ("ranklist_init.png", "ranklist_epoch0.png", "ranklist_epoch1.png", "curves.png"):
    assert name in names
  with Image.open(os.path.join(workdir, "ranklist_epoch1.png")) as image:
    assert image.size == (5 * 78 + 12, 3 * 156)  # (topk + 1) thumbs per row, 3 query rows
  with Image.open(os.path.join(workdir, "curves.png")) as image:
    assert image.size == (900, 600)

  # TensorBoard holds the same scalars as metrics.jsonl, at step = epochs done.
  records, _ = run_lib.Run(workdir).metrics_lines()
  scalars = tb.read_scalars(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in scalars["eval/mAP"]] == [0, 1, 2]
  logged = [r["mAP"] for r in records if "mAP" in r]
  np.testing.assert_allclose([value for _, value in scalars["eval/mAP"]], logged, rtol=1e-6)
  images = tb.read_images(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in images["ranklist"]] == [0, 1, 2]

  # Direct transfer: the initial model, evaluated from an existing workdir, reproduces the
  # "initial" record written before training.
  initial = commands.evaluate(config, workdir, checkpoint="init")
  assert (initial["checkpoint"], initial["epoch"]) == (0, -1)
  assert initial["mAP"] == pytest.approx(records[0]["mAP"], abs=1e-6)
  assert os.path.exists(os.path.join(workdir, "eval_init.json"))

  # A checkpoint can also be named by its folder.
  by_path = commands.evaluate(config, workdir, checkpoint=os.path.join(workdir, "checkpoints", "2"))
  latest = commands.evaluate(config, workdir, checkpoint="latest")
  assert by_path["checkpoint"] == latest["checkpoint"] == 2
  assert by_path["mAP"] == pytest.approx(latest["mAP"], abs=1e-9)

  # Feature export of a split.
  out = str(tmp_path / "query.npz")
  summary = commands.extract(config, workdir, split="query", out=out, checkpoint="latest")
  exported = feature_files.read_features(out)
  assert exported.features.shape[0] == summary["num_images"] > 0
  np.testing.assert_allclose(np.linalg.norm(exported.features, axis=1), 1.0, atol=1e-5)

  # Cross-dataset evaluation: another dataset's query/gallery with the trained model.
  other = str(tmp_path / "other")
  synthetic.generate_market_dataset(
    other,
    num_train_identities=4,
    num_test_identities=5,
    num_cameras=2,
    images_per_camera=(2, 2),
    height=64,
    width=32,
    seed=5,
  )
  config.eval.root = other
  cross = commands.evaluate(config, workdir, checkpoint="latest")
  assert os.path.exists(os.path.join(workdir, "eval_2_market1501.json"))
  assert 0.0 <= cross["mAP"] <= 1.0
