"""The published recipes' run-level behaviour: precision, best-vs-last reporting, weights."""

import numpy as np
import pytest

from ccreid_jax import memory as memory_lib
from ccreid_jax import models, train
from ccreid_jax import run as run_lib
from ccreid_jax import state as state_lib
from ccreid_jax.distributed import make_mesh
from ccreid_jax.validation import ConfigError, validate_config

from conftest import tiny_config


def _matmul_precisions(lowered) -> list[str]:
  """The ``precision_config`` attribute of every convolution and dot in a lowered program."""
  found = []

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          inner = op.operation
          if inner.name in ("stablehlo.convolution", "stablehlo.dot_general"):
            attrs = inner.attributes
            found.append(str(attrs["precision_config"]) if "precision_config" in attrs else "")
          walk(inner)

  walk(lowered.compiler_ir("stablehlo").operation)
  return found


@pytest.mark.parametrize("precision", ["default", "float32"])
def test_model_precision_reaches_the_compiled_step(precision):
  """``model.precision="float32"`` makes every convolution and product of the train step
  ask for HIGHEST precision (no TF32 / bf16 passes on GPUs); "default" leaves JAX's default,
  except the memory logits, which always run at HIGHEST."""
  config = tiny_config("unused")
  config.model.precision = precision
  model = models.create_model(config.model)
  tx = state_lib.make_optimizer(config.optim, config.train.iters)
  dim = models.feature_dim(config.model.depth, config.model.width)
  memory = memory_lib.init_memory(np.eye(4, dim, dtype=np.float32), 16)
  state = state_lib.create_train_state(model, config, tx=tx, memory=memory)
  step = train.make_train_step(config, make_mesh())
  images = np.zeros((16, 32, 16, 3), np.uint8)
  labels = np.zeros(16, np.int32)
  precisions = _matmul_precisions(step.lower(state, images, labels))
  assert len(precisions) > 10  # the convolutions, forward and backward
  highest = [p for p in precisions if "HIGHEST" in p]
  if precision == "float32":
    assert len(highest) == len(precisions)
  else:
    assert 0 < len(highest) < len(precisions) // 2  # the memory products only


def test_training_without_weights_is_refused_with_what_to_do():
  config = tiny_config("unused")
  config.data.root = "."
  config.model.pretrained = ""
  config.model.depth = 18
  with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth"):
    validate_config(config, num_devices=1, training=True)
  config.model.depth = 50
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=1, training=True)
  message = str(info.value)
  assert "resnet50-19c8e357.pth" in message and "weights/" in message
  assert "--config.model.pretrained=none" in message
  config.model.arch = "resnet50_ibn_a"
  with pytest.raises(ConfigError, match=r"resnet50_ibn_a\.pth\.tar"):
    validate_config(config, num_devices=1, training=True)
  validate_config(config, num_devices=1)  # evaluation needs no weights
  config.model.pretrained = "none"
  validate_config(config, num_devices=1, training=True)  # random init, asked for explicitly


def test_best_and_last_evaluations_are_both_reported(tiny_market, tmp_path, monkeypatch):
  """The run's result is its best checkpoint, evaluated again at the end; the last is kept.

  Epoch 1's evaluation is made to look worse (mAP -1), so epoch 0's checkpoint is the best:
  the final evaluation restores it and must give exactly epoch 0's figures again.
  """
  config = tiny_config(tiny_market)
  real = train.evaluate_variables
  calls = []

  def evaluate_variables(*args, **kwargs):
    metrics, distmat = real(*args, **kwargs)
    calls.append(dict(metrics))
    if len(calls) == 2:
      metrics = dict(metrics, mAP=-1.0)
    return metrics, distmat

  monkeypatch.setattr(train, "evaluate_variables", evaluate_variables)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(calls) == 3  # epoch 0, epoch 1, the best checkpoint again
  assert results["best"]["epoch"] == 0 and results["last"]["epoch"] == 1
  assert results["last"]["mAP"] == -1.0
  for key, value in calls[0].items():
    assert results["best"][key] == value == results[key], key
  records = run_lib.Run(str(tmp_path / "run")).epoch_records()
  assert [r["mAP"] for r in records] == [calls[0]["mAP"], -1.0]
