"""Configs load, carry the published defaults, and accept nested command-line overrides."""

import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from ccreid_jax.validation import ConfigError, validate_config
from conftest import ROOT

CONFIG_NAMES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "configs"))
                      if name.endswith(".py") and name != "__init__.py")

# What each shipped recipe must set: (dataset, steps per epoch, eps, image size, clustering,
# RLCC, hard update, architecture). Every other field is the published default (below).
RECIPES = {
    "market1501": ("market1501", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
    "dukemtmcreid": ("dukemtmcreid", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
    "msmt17": ("msmt17", 400, 0.6, (256, 128), "dbscan", False, False, "resnet"),
    "veri776": ("veri776", 400, 0.6, (224, 224), "dbscan", False, False, "resnet"),
    "personx": ("personx", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
    "market1501_infomap": ("market1501", 200, 0.6, (256, 128), "infomap", False, False, "resnet"),
    "dukemtmcreid_infomap": ("dukemtmcreid", 200, 0.6, (256, 128), "infomap", False, False,
                             "resnet"),
    "msmt17_infomap": ("msmt17", 400, 0.6, (256, 128), "infomap", False, False, "resnet"),
    "veri776_infomap": ("veri776", 400, 0.6, (224, 224), "infomap", False, False, "resnet"),
    "market1501_rlcc": ("market1501", 200, 0.6, (256, 128), "dbscan", True, False, "resnet"),
    "msmt17_rlcc": ("msmt17", 400, 0.6, (256, 128), "dbscan", True, False, "resnet"),
    "veri776_rlcc": ("veri776", 400, 0.6, (224, 224), "dbscan", True, False, "resnet"),
    "market1501_ibn_hard": ("market1501", 400, 0.4, (256, 128), "dbscan", False, True,
                            "resnet50_ibn_a"),
}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_shipped_config_validates(name, tmp_path):
  """Each config passes validation (given a data folder); training refuses it without
  ImageNet weights, except the demo, which asks for a random initialisation."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.data.root = str(tmp_path)
  validate_config(config, num_devices=1)
  validate_config(config, num_devices=4)
  if name == "demo":
    assert config.model.pretrained == "none"
    validate_config(config, num_devices=1, training=True)
  else:
    assert config.model.pretrained == ""
    with pytest.raises(ConfigError, match="model.pretrained"):
      validate_config(config, num_devices=1, training=True)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    config.model.pretrained = str(weights)
    validate_config(config, num_devices=1, training=True)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_pin_their_published_settings(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  dataset, iters, eps, size, method, rlcc, hard, arch = RECIPES[name]
  assert config.data.name == dataset and config.train.iters == iters
  assert config.cluster.eps == eps and (config.data.height, config.data.width) == size
  assert config.cluster.method == method and config.cluster.distance == "jaccard"
  assert config.rlcc.enabled is rlcc
  assert config.memory.update_rule == ("hard" if hard else "momentum")
  assert config.model.arch == arch and config.model.depth == 50
  assert (config.train.batch_size, config.train.num_instances, config.train.epochs) == (
      256, 16, 50)
  assert (config.memory.temperature, config.memory.momentum) == (0.05, 0.1)
  assert (config.optim.lr, config.optim.weight_decay, config.optim.step_size) == (
      3.5e-4, 5e-4, 20)
  assert (config.model.pooling, config.model.last_stride) == ("gem", 1)
  assert (config.cluster.k1, config.cluster.k2, config.cluster.min_samples) == (30, 6, 4)
  if method == "infomap":
    assert (config.cluster.infomap_k, config.cluster.infomap_min_similarity,
            config.cluster.infomap_min_cluster_size, config.cluster.infomap_seed) == (
                15, 0.5, 5, 0)
  assert not config.cluster.reliable and not config.rlcc.outliers_as_singletons


@pytest.mark.parametrize("name", ["market1501_rlcc_official", "msmt17_rlcc_official"])
def test_official_rlcc_recipe(name):
  """The RLCC paper's own recipe (tools/config.yaml of its code): SpCL's base, not ours."""
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.data.name == name.split("_")[0]
  assert config.cluster.reliable and config.cluster.method == "dbscan"
  assert (config.cluster.eps_tight, config.cluster.eps, config.cluster.eps_loose) == (
      0.58, 0.6, 0.62)
  assert config.rlcc.enabled and config.rlcc.outliers_as_singletons
  assert (config.rlcc.alpha, config.rlcc.beta, config.rlcc.pred_temp) == (0.9, 0.0, 30.0)
  assert (config.memory.temperature, config.memory.momentum) == (0.04, 0.2)
  assert config.memory.update_rule == "momentum"
  assert (config.train.batch_size, config.train.num_instances, config.train.iters) == (
      64, 4, 400)
  assert (config.train.epochs, config.train.eval_every, config.model.bn_group_size) == (
      50, 5, 16)
  assert (config.optim.lr, config.optim.weight_decay, config.optim.step_size) == (
      3.5e-4, 5e-4, 20)
  assert (config.cluster.k1, config.cluster.k2, config.cluster.min_samples) == (30, 6, 4)
  assert (config.model.pooling, config.data.height, config.data.width) == ("gem", 256, 128)


@pytest.mark.parametrize("name,dataset,eps", [("market1501_cam", "market1501", 0.4),
                                              ("msmt17_cam", "msmt17", 0.6),
                                              ("veri776_cam", "veri776", 0.6)])
def test_camera_aware_recipes_use_the_ca_jaccard_papers_settings(name, dataset, eps):
  config = importlib.import_module(f"configs.{name}").get_config()
  base = importlib.import_module(f"configs.{dataset}").get_config()
  assert config.data.name == dataset and config.cluster.distance == "ca_jaccard"
  assert (config.cluster.eps, config.model.pooling) == (eps, "avg")
  assert (config.cluster.ca_k1_intra, config.cluster.ca_k1_inter, config.cluster.ca_k2_intra,
          config.cluster.ca_k2_inter, config.cluster.ca_k2_intra_first,
          config.cluster.ca_k2_inter_first) == (5, 20, 2, 4, 3, 3)
  assert config.train.iters == base.train.iters and not config.camera.enabled
  assert (config.data.height, config.data.width) == (base.data.height, base.data.width)


def test_every_recipe_names_its_published_figure():
  """Every dataset config's docstring says what it reproduces (or that nothing published does)."""
  for name in CONFIG_NAMES:
    if name in ("default", "demo"):
      continue
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert "Reproduces:" in doc or "no published figure" in doc, name


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
          "--config.memory.update_rule=hard", "--config.train.iters=7"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, "cfg", flag_values=values, sys_argv=argv)
  values(argv)
  config = holder.value
  assert config.cluster.eps == 0.5
  assert config.memory.update_rule == "hard"
  assert config.train.iters == 7
  assert config.data.name == "market1501"


def test_rlcc_configs_use_the_paper_settings():
  for name in ("market1501_rlcc", "msmt17_rlcc", "veri776_rlcc"):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.rlcc.enabled is True
    assert (config.rlcc.alpha, config.rlcc.beta, config.rlcc.pred_temp) == (0.9, 0.0, 30.0)
  assert importlib.import_module("configs.default").get_config().rlcc.enabled is False
