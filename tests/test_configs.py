"""Configs load, carry the published defaults, and accept nested command-line overrides."""

import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT

CONFIG_NAMES = ["default", "market1501", "dukemtmcreid", "msmt17", "veri776", "personx", "demo",
                "market1501_infomap", "dukemtmcreid_infomap", "msmt17_infomap", "veri776_infomap",
                "market1501_rlcc", "msmt17_rlcc", "veri776_rlcc"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_is_consistent(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.train.batch_size % config.train.num_instances == 0
  assert config.model.bn_group_size > 0


def test_published_defaults():
  config = importlib.import_module("configs.default").get_config()
  assert (config.train.batch_size, config.train.num_instances) == (256, 16)
  assert (config.optim.lr, config.optim.weight_decay) == (3.5e-4, 5e-4)
  assert (config.optim.step_size, config.optim.gamma, config.train.epochs) == (20, 0.1, 50)
  assert (config.memory.temperature, config.memory.momentum) == (0.05, 0.1)
  assert (config.cluster.eps, config.cluster.min_samples) == (0.6, 4)
  assert (config.cluster.k1, config.cluster.k2) == (30, 6)
  assert (config.data.height, config.data.width, config.seed) == (256, 128, 1)
  assert (config.model.pooling, config.model.last_stride, config.model.bn_group_size) == (
      "gem", 1, 64)
  veri = importlib.import_module("configs.veri776").get_config()
  assert (veri.data.height, veri.data.width, veri.train.iters) == (224, 224, 400)
  assert importlib.import_module("configs.msmt17").get_config().train.iters == 400


def test_nested_override_from_the_command_line():
  path = os.path.join(ROOT, "configs", "market1501.py")
  argv = ["prog", f"--config={path}", "--config.cluster.eps=0.5",
          "--config.memory.hard=True", "--config.train.iters=7"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, "cfg", flag_values=values, sys_argv=argv)
  values(argv)
  config = holder.value
  assert config.cluster.eps == 0.5
  assert config.memory.hard is True
  assert config.train.iters == 7
  assert config.data.name == "market1501"


def test_rlcc_configs_use_the_paper_settings():
  for name in ("market1501_rlcc", "msmt17_rlcc", "veri776_rlcc"):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.rlcc.enabled is True
    assert (config.rlcc.alpha, config.rlcc.beta, config.rlcc.pred_temp) == (0.9, 0.0, 30.0)
  assert importlib.import_module("configs.default").get_config().rlcc.enabled is False
