"""TensorBoard event files: scalars and images written, then read back from the files."""

import logging
import os
import sys

import numpy as np
import pytest

from ccreid_jax import tensorboard as tb
from ccreid_jax.evaluation import visualize as vis


def _rank_list():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 20, 10, 3), dtype=np.uint8)
  distmat = rng.random((2, 4)).astype(np.float32)
  return vis.rank_list_image(
    images[:2],
    [1, 2],
    [0, 1],
    images[2:],
    [1, 2, 3, 1],
    [1, 0, 2, 0],
    distmat,
    query_indices=[0, 1],
    topk=3,
    thumb=(24, 12),
  )


def test_scalars_and_image_read_back(tmp_path):
  pytest.importorskip("tensorboardX")
  logdir = str(tmp_path / "tb")
  image = _rank_list()
  with tb.TensorBoardWriter(logdir) as writer:
    assert writer.enabled
    writer.scalars(0, {"eval/mAP": 0.25, "eval/rank1": np.float32(0.5), "note": "skipped"})
    writer.scalars(3, {"eval/mAP": 0.75, "train/loss": 2})
    writer.image("ranklist", 3, image)
  assert any(name.startswith("events.out.tfevents.") for name in os.listdir(logdir))

  scalars = tb.read_scalars(logdir)
  assert set(scalars) == {"eval/mAP", "eval/rank1", "train/loss"}
  assert scalars["eval/mAP"] == [(0, 0.25), (3, 0.75)]
  assert scalars["eval/rank1"] == [(0, 0.5)]
  assert scalars["train/loss"] == [(3, 2.0)]

  images = tb.read_images(logdir)
  assert list(images) == ["ranklist"]
  [(step, read)] = images["ranklist"]
  assert step == 3
  assert read.size == image.size
  np.testing.assert_array_equal(np.asarray(read.convert("RGB")), np.asarray(image))


def test_metrics_records_map_to_tags_and_epochs_done(tmp_path):
  pytest.importorskip("tensorboardX")
  logdir = str(tmp_path / "tb")
  writer = tb.TensorBoardWriter(logdir)
  writer.write_record("initial", mAP=0.125, rank1=0.25, rank5=0.5, rank10=0.625)
  writer.write_record(
    "epoch",
    epoch=2,
    clusters=40,
    outliers=7,
    cluster_ari=0.5,
    loss=3.5,
    lr=0.00035,
    steps=30,
    time_train=1.5,
    rlcc_num_new=2,
    mAP=0.375,
    rank1=0.5,
    rank5=0.75,
    rank10=0.875,
  )
  writer.close()
  writer.close()  # A second close is harmless.

  scalars = tb.read_scalars(logdir)
  assert scalars["eval/mAP"] == [(0, 0.125), (3, 0.375)]  # step = epochs done
  assert scalars["eval/rank10"] == [(0, 0.625), (3, 0.875)]
  assert scalars["cluster/clusters"] == [(3, 40.0)]
  assert scalars["cluster/outliers"] == [(3, 7.0)]
  assert scalars["cluster/rlcc_num_new"] == [(3, 2.0)]
  assert scalars["time/train"] == [(3, 1.5)]
  assert scalars["train/loss"] == [(3, 3.5)]
  assert scalars["train/lr"][0][0] == 3
  assert scalars["train/lr"][0][1] == pytest.approx(0.00035)
  assert not any(tag.endswith(("/epoch", "/steps", "/time", "/kind")) for tag in scalars)


def test_record_scalars_and_step():
  assert tb.record_step("initial", {"mAP": 0.1}) == 0
  assert tb.record_step("epoch", {"epoch": 4}) == 5
  with pytest.raises(ValueError):
    tb.record_step("epoch", {})
  values = tb.record_scalars(
    {"kind": "epoch", "time": 1.0, "epoch": 1, "loss": float("nan"), "flag": True, "clusters": 3}
  )
  assert set(values) == {"train/loss", "cluster/clusters"}
  assert np.isnan(values["train/loss"])


def test_reader_detects_a_corrupt_file(tmp_path):
  pytest.importorskip("tensorboardX")
  logdir = str(tmp_path / "tb")
  with tb.TensorBoardWriter(logdir) as writer:
    writer.scalars(1, {"a": 1.0})
  [name] = os.listdir(logdir)
  path = os.path.join(logdir, name)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[-6] ^= 0xFF  # Inside the last record's payload.
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    tb.read_scalars(logdir)


def test_without_tensorboardx_it_is_a_no_op_with_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now fails.
  monkeypatch.setattr(tb, "_warned_missing", False)
  caplog.set_level(logging.WARNING, logger="ccreid_jax")
  logdir = tmp_path / "tb"
  for _ in range(2):
    writer = tb.TensorBoardWriter(str(logdir))
    assert not writer.enabled
    writer.scalars(1, {"eval/mAP": 0.5})
    writer.image("ranklist", 1, _rank_list())
    writer.write_record("epoch", epoch=0, loss=1.0)
    writer.flush()
    writer.close()
  warnings = [r for r in caplog.records if "tensorboardX is not installed" in r.getMessage()]
  assert len(warnings) == 1
  assert not logdir.exists()


def test_disabled_writer_writes_nothing_and_does_not_warn(tmp_path, caplog):
  caplog.set_level(logging.WARNING, logger="ccreid_jax")
  writer = tb.TensorBoardWriter(str(tmp_path / "tb"), enabled=False)
  assert not writer.enabled
  writer.write_record("initial", mAP=0.5)
  writer.close()
  assert not (tmp_path / "tb").exists()
  assert not caplog.records
