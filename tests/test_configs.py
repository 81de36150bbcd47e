"""Configs load, carry the published defaults, and accept nested command-line overrides;
recipes are small overrides of the defaults that ``--config`` finds by name."""

import ast
import importlib
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from ccreid_jax import configs
from ccreid_jax.configs import default, variants
from ccreid_jax.validation import ConfigError, validate_config

from conftest import ROOT

RECIPE_NAMES = [
  "custom",
  "demo",
  "dukemtmcreid",
  "dukemtmcreid_bmw",
  "dukemtmcreid_infomap",
  "market1501",
  "market1501_bmw",
  "market1501_cam",
  "market1501_ibn_hard",
  "market1501_infomap",
  "market1501_rlcc",
  "market1501_rlcc_official",
  "msmt17",
  "msmt17_bmw",
  "msmt17_cam",
  "msmt17_infomap",
  "msmt17_rlcc",
  "msmt17_rlcc_official",
  "personx",
  "veri776",
  "veri776_bmw",
  "veri776_cam",
  "veri776_infomap",
  "veri776_rlcc",
]
CONFIG_NAMES = ["default", *RECIPE_NAMES]

# What each shipped recipe must set: (dataset, steps per epoch, eps, image size, clustering,
# RLCC, hard update, architecture). Every other field is the published default (below).
RECIPES = {
  "market1501": ("market1501", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
  "dukemtmcreid": ("dukemtmcreid", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
  "msmt17": ("msmt17", 400, 0.6, (256, 128), "dbscan", False, False, "resnet"),
  "veri776": ("veri776", 400, 0.6, (224, 224), "dbscan", False, False, "resnet"),
  "personx": ("personx", 200, 0.6, (256, 128), "dbscan", False, False, "resnet"),
  "market1501_infomap": ("market1501", 200, 0.6, (256, 128), "infomap", False, False, "resnet"),
  "dukemtmcreid_infomap": ("dukemtmcreid", 200, 0.6, (256, 128), "infomap", False, False, "resnet"),
  "msmt17_infomap": ("msmt17", 400, 0.6, (256, 128), "infomap", False, False, "resnet"),
  "veri776_infomap": ("veri776", 400, 0.6, (224, 224), "infomap", False, False, "resnet"),
  "market1501_rlcc": ("market1501", 200, 0.6, (256, 128), "dbscan", True, False, "resnet"),
  "msmt17_rlcc": ("msmt17", 400, 0.6, (256, 128), "dbscan", True, False, "resnet"),
  "veri776_rlcc": ("veri776", 400, 0.6, (224, 224), "dbscan", True, False, "resnet"),
  "market1501_ibn_hard": (
    "market1501",
    400,
    0.4,
    (256, 128),
    "dbscan",
    False,
    True,
    "resnet50_ibn_a",
  ),
}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_shipped_config_validates(name, tmp_path):
  """Each config passes validation (given a data folder); training refuses it without
  ImageNet weights, except the demo, which asks for a random initialisation."""
  config = importlib.import_module(f"ccreid_jax.configs.{name}").get_config()
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
  config = importlib.import_module(f"ccreid_jax.configs.{name}").get_config()
  dataset, iters, eps, size, method, rlcc, hard, arch = RECIPES[name]
  assert config.data.name == dataset and config.train.iters == iters
  assert config.cluster.eps == eps and (config.data.height, config.data.width) == size
  assert config.cluster.method == method and config.cluster.distance == "jaccard"
  assert config.rlcc.enabled is rlcc
  assert config.memory.update_rule == ("hard" if hard else "momentum")
  assert config.model.arch == arch and config.model.depth == 50
  assert (config.train.batch_size, config.train.num_instances, config.train.epochs) == (256, 16, 50)
  assert (config.memory.temperature, config.memory.momentum) == (0.05, 0.1)
  assert (config.optim.lr, config.optim.weight_decay, config.optim.step_size) == (3.5e-4, 5e-4, 20)
  assert (config.model.pooling, config.model.last_stride) == ("gem", 1)
  assert (config.cluster.k1, config.cluster.k2, config.cluster.min_samples) == (30, 6, 4)
  if method == "infomap":
    assert (
      config.cluster.infomap_k,
      config.cluster.infomap_min_similarity,
      config.cluster.infomap_min_cluster_size,
      config.cluster.infomap_seed,
    ) == (15, 0.5, 5, 0)
  assert not config.cluster.reliable and not config.rlcc.outliers_as_singletons


@pytest.mark.parametrize("name", ["market1501_rlcc_official", "msmt17_rlcc_official"])
def test_official_rlcc_recipe(name):
  """The RLCC paper's own recipe (tools/config.yaml of its code): SpCL's base, not ours."""
  config = importlib.import_module(f"ccreid_jax.configs.{name}").get_config()
  assert config.data.name == name.split("_")[0]
  assert config.cluster.reliable and config.cluster.method == "dbscan"
  assert (config.cluster.eps_tight, config.cluster.eps, config.cluster.eps_loose) == (
    0.58,
    0.6,
    0.62,
  )
  assert config.rlcc.enabled and config.rlcc.outliers_as_singletons
  assert (config.rlcc.alpha, config.rlcc.beta, config.rlcc.pred_temp) == (0.9, 0.0, 30.0)
  assert (config.memory.temperature, config.memory.momentum) == (0.04, 0.2)
  assert config.memory.update_rule == "momentum"
  assert (config.train.batch_size, config.train.num_instances, config.train.iters) == (64, 4, 400)
  assert (config.train.epochs, config.train.eval_every, config.model.bn_group_size) == (50, 5, 16)
  assert (config.optim.lr, config.optim.weight_decay, config.optim.step_size) == (3.5e-4, 5e-4, 20)
  assert (config.cluster.k1, config.cluster.k2, config.cluster.min_samples) == (30, 6, 4)
  assert (config.model.pooling, config.data.height, config.data.width) == ("gem", 256, 128)


@pytest.mark.parametrize(
  "name,dataset,eps",
  [
    ("market1501_cam", "market1501", 0.4),
    ("msmt17_cam", "msmt17", 0.6),
    ("veri776_cam", "veri776", 0.6),
  ],
)
def test_camera_aware_recipes_use_the_ca_jaccard_papers_settings(name, dataset, eps):
  config = importlib.import_module(f"ccreid_jax.configs.{name}").get_config()
  base = importlib.import_module(f"ccreid_jax.configs.{dataset}").get_config()
  assert config.data.name == dataset and config.cluster.distance == "ca_jaccard"
  assert (config.cluster.eps, config.model.pooling) == (eps, "avg")
  assert (
    config.cluster.ca_k1_intra,
    config.cluster.ca_k1_inter,
    config.cluster.ca_k2_intra,
    config.cluster.ca_k2_inter,
    config.cluster.ca_k2_intra_first,
    config.cluster.ca_k2_inter_first,
  ) == (5, 20, 2, 4, 3, 3)
  assert config.train.iters == base.train.iters and not config.camera.enabled
  assert (config.data.height, config.data.width) == (base.data.height, base.data.width)


def test_every_recipe_names_its_published_figure():
  """Every dataset config's docstring says what it reproduces (or that nothing published does)."""
  for name in CONFIG_NAMES:
    if name in ("default", "demo"):
      continue
    doc = importlib.import_module(f"ccreid_jax.configs.{name}").__doc__
    assert "Reproduces:" in doc or "no published figure" in doc, name


def test_published_defaults():
  config = importlib.import_module("ccreid_jax.configs.default").get_config()
  assert (config.train.batch_size, config.train.num_instances) == (256, 16)
  assert (config.optim.lr, config.optim.weight_decay) == (3.5e-4, 5e-4)
  assert (config.optim.step_size, config.optim.gamma, config.train.epochs) == (20, 0.1, 50)
  assert (config.memory.temperature, config.memory.momentum) == (0.05, 0.1)
  assert (config.cluster.eps, config.cluster.min_samples) == (0.6, 4)
  assert (config.cluster.k1, config.cluster.k2) == (30, 6)
  assert (config.data.height, config.data.width, config.seed) == (256, 128, 1)
  assert (config.model.pooling, config.model.last_stride, config.model.bn_group_size) == (
    "gem",
    1,
    64,
  )
  veri = importlib.import_module("ccreid_jax.configs.veri776").get_config()
  assert (veri.data.height, veri.data.width, veri.train.iters) == (224, 224, 400)
  assert importlib.import_module("ccreid_jax.configs.msmt17").get_config().train.iters == 400


def test_nested_override_from_the_command_line():
  path = os.path.join(ROOT, "configs", "market1501.py")
  argv = [
    "prog",
    f"--config={path}",
    "--config.cluster.eps=0.5",
    "--config.memory.update_rule=hard",
    "--config.train.iters=7",
  ]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "cfg", flag_values=values, sys_argv=argv)
  values(argv)
  config = holder.value
  assert config.cluster.eps == 0.5
  assert config.memory.update_rule == "hard"
  assert config.train.iters == 7
  assert config.data.name == "market1501"


def test_rlcc_configs_use_the_paper_settings():
  for name in ("market1501_rlcc", "msmt17_rlcc", "veri776_rlcc"):
    config = importlib.import_module(f"ccreid_jax.configs.{name}").get_config()
    assert config.rlcc.enabled is True
    assert (config.rlcc.alpha, config.rlcc.beta, config.rlcc.pred_temp) == (0.9, 0.0, 30.0)
  assert importlib.import_module("ccreid_jax.configs.default").get_config().rlcc.enabled is False


# ---------------------------------------------------------------------------------------
# Recipes as small overrides of the defaults.
# ---------------------------------------------------------------------------------------

_CAM = {"cluster.distance": "ca_jaccard", "model.pooling": "avg"}
_OFFICIAL_RLCC = {
  "cluster.reliable": True,
  "rlcc.enabled": True,
  "rlcc.outliers_as_singletons": True,
  "memory.temperature": 0.04,
  "memory.momentum": 0.2,
  "train.batch_size": 64,
  "train.num_instances": 4,
  "train.iters": 400,
  "train.eval_every": 5,
  "model.bn_group_size": 16,
}
_MSMT17 = {"data.name": "msmt17", "train.iters": 400}
_VERI776 = {"data.name": "veri776", "data.height": 224, "data.width": 224, "train.iters": 400}
_BMW = {
  "memory.update_rule": "bmw",
  "train.epochs": 75,
  "optim.step_size": 25,
  "model.bn_group_size": 256,
}
# Every field where a recipe differs from default.py, with its value (for the older recipes,
# the values they had before they became overrides of the defaults).
DIFFERS_FROM_DEFAULT = {
  "custom": {"data.name": "folder", "data.root": "my_images"},
  "demo": {
    "data.root": "demo_data",
    "data.height": 128,
    "data.width": 64,
    "model.depth": 18,
    "model.width": 32,
    "model.bn_group_size": 32,
    "model.pretrained": "none",
    "cluster.k1": 15,
    "cluster.eps": 0.5,
    "train.epochs": 15,
    "train.iters": 40,
    "train.batch_size": 64,
    "train.num_instances": 8,
    "train.log_every": 10,
    "train.eval_every": 5,
    "train.eval_initial": True,
    "optim.step_size": 12,
  },
  "dukemtmcreid": {"data.name": "dukemtmcreid"},
  "dukemtmcreid_bmw": {"data.name": "dukemtmcreid", **_BMW, "cluster.eps": 0.7},
  "dukemtmcreid_infomap": {"data.name": "dukemtmcreid", "cluster.method": "infomap"},
  "market1501": {},
  "market1501_bmw": _BMW,
  "market1501_cam": {**_CAM, "cluster.eps": 0.4},
  "market1501_ibn_hard": {
    "model.arch": "resnet50_ibn_a",
    "memory.update_rule": "hard",
    "cluster.eps": 0.4,
    "train.iters": 400,
  },
  "market1501_infomap": {"cluster.method": "infomap"},
  "market1501_rlcc": {"rlcc.enabled": True},
  "market1501_rlcc_official": _OFFICIAL_RLCC,
  "msmt17": _MSMT17,
  "msmt17_bmw": {**_MSMT17, **_BMW},
  "msmt17_cam": {**_MSMT17, **_CAM},
  "msmt17_infomap": {**_MSMT17, "cluster.method": "infomap"},
  "msmt17_rlcc": {**_MSMT17, "rlcc.enabled": True},
  "msmt17_rlcc_official": {**_MSMT17, **_OFFICIAL_RLCC},
  "personx": {"data.name": "personx"},
  "veri776": _VERI776,
  "veri776_bmw": {
    "data.name": "veri776",
    "data.width": 256,
    "train.iters": 400,
    **_BMW,
    "cluster.eps": 0.7,
    "model.bn_group_size": 128,
  },  # 256 x 256 images
  "veri776_cam": {**_VERI776, **_CAM},
  "veri776_infomap": {**_VERI776, "cluster.method": "infomap"},
  "veri776_rlcc": {**_VERI776, "rlcc.enabled": True},
}


def _fields(config) -> dict:
  """``{"group.field": value}`` (the schema is one level of groups, and ``seed``)."""
  out = {}
  for group, value in config.to_dict().items():
    items = value.items() if isinstance(value, dict) else [("", value)]
    out.update({f"{group}.{key}".rstrip("."): v for key, v in items})
  return out


def _recipe(name):
  return importlib.import_module(f"ccreid_jax.configs.{name}").get_config()


def _restatements(build):
  """``(field, value)`` of every assignment made while ``build()`` builds its config that
  gives a field the value it holds already."""
  found, original = [], ml_collections.ConfigDict.__setitem__

  def recording(self, key, value):
    if key in self and not isinstance(value, ml_collections.ConfigDict) and self[key] == value:
      found.append((self, key, value))
    original(self, key, value)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ml_collections.ConfigDict, "__setitem__", recording)
    config = build()
  groups = {
    id(config[group]): group
    for group in config
    if isinstance(config[group], ml_collections.ConfigDict)
  }
  return [(f"{groups.get(id(node), '?')}.{key}", value) for node, key, value in found]


def test_the_package_is_this_checkouts_configs_folder():
  assert os.path.join(ROOT, "ccreid_jax", "configs") == configs.FOLDER
  # The top-level configs/ of the repository is that folder (a link), for configs/<name>.py.
  assert os.path.samefile(os.path.join(ROOT, "configs"), configs.FOLDER)
  assert configs.recipe_names() == RECIPE_NAMES == sorted(DIFFERS_FROM_DEFAULT)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipes_differ_from_the_defaults_in_their_fields_only(name):
  base = _fields(default.get_config())
  config = _fields(_recipe(name))
  assert sorted(config) == sorted(base)
  assert {k: v for k, v in config.items() if base[k] != v} == DIFFERS_FROM_DEFAULT[name]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_no_recipe_restates_a_value_its_config_holds_already(name):
  assert _restatements(lambda: _recipe(name)) == []


def test_the_restatement_check_finds_restated_values():
  def restating():
    config = variants.rlcc(default.get_config())
    config.rlcc.alpha = 0.9  # the default
    config.cluster.eps = 0.4
    config.cluster.eps = 0.4  # what the line above set
    return variants.infomap(variants.infomap(config))

  assert _restatements(restating) == [
    ("rlcc.alpha", 0.9),
    ("cluster.eps", 0.4),
    ("cluster.method", "infomap"),
  ]


def _imports(path):
  imported = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported |= {f"{'.' * node.level}{node.module}.{alias.name}" for alias in node.names}
  return imported


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipes_import_the_defaults_the_variants_and_their_own_datasets_recipe_only(name):
  dataset = name.split("_")[0]
  allowed = {"ccreid_jax.configs.default", "ccreid_jax.configs.variants"}
  if dataset != name:
    allowed.add(f"ccreid_jax.configs.{dataset}")
  imported = _imports(os.path.join(configs.FOLDER, f"{name}.py"))
  assert imported <= allowed, imported - allowed
  assert _imports(os.path.join(configs.FOLDER, "variants.py")) == {"ml_collections"}


# ---------------------------------------------------------------------------------------
# --config by recipe name.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_name_resolves_and_loads(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no file of that name here
  path = os.path.join(configs.FOLDER, f"{name}.py")
  assert configs.resolve(name) == configs.resolve(f"{name}.py") == path
  argv = ["prog", f"--config={configs.resolve(name)}", "--config.seed=7"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "cfg", flag_values=values, sys_argv=argv)
  values(argv)
  expected = _recipe(name)
  expected.seed = 7
  assert holder.value.to_dict() == expected.to_dict()


def test_resolve_keeps_paths_and_the_config_argument(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert (
    configs.resolve("msmt17_cam:sweep") == os.path.join(configs.FOLDER, "msmt17_cam.py") + ":sweep"
  )
  assert configs.resolve("market1501.py:") == os.path.join(configs.FOLDER, "market1501.py:")
  (tmp_path / "market1501.py").write_text("")  # a file of the working directory wins
  assert configs.resolve("market1501.py") == "market1501.py"
  assert configs.resolve("market1501.py:a") == "market1501.py:a"
  assert configs.resolve("market1501") == os.path.join(configs.FOLDER, "market1501.py")
  mine = str(tmp_path / "mine.py")
  (tmp_path / "mine.py").write_text("")
  assert configs.resolve(mine) == mine and configs.resolve(f"{mine}:x") == f"{mine}:x"


def test_an_unknown_recipe_name_lists_the_names_with_the_closest(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as info:
    configs.resolve("msmt17_cma")
  first, names = str(info.value).splitlines()
  assert first == "msmt17_cma: no such file and no recipe of that name; did you mean msmt17_cam?"
  assert names == "Recipes: " + ", ".join(RECIPE_NAMES)
  with pytest.raises(ValueError, match=r"^xyzzy: no such file and no recipe of that name\n"):
    configs.resolve("xyzzy:arg")
  # A path (from another folder than the repository root): the recipe is named.
  with pytest.raises(
    ValueError,
    match=r"^configs/msmt17\.py: no such file; the package's "
    r"recipe of that name is --config msmt17$",
  ):
    configs.resolve("configs/msmt17.py")


def test_the_command_line_resolves_config_names_before_absl_parses(tmp_path, monkeypatch, capsys):
  from ccreid_jax import main

  monkeypatch.chdir(tmp_path)
  path = os.path.join(configs.FOLDER, "msmt17_cam.py")
  argv = ["prog", "--config", "msmt17_cam", "--config.cluster.eps=0.5", "--workdir", "w"]
  assert main._resolve_config_argument(argv) == [
    "prog",
    "--config",
    path,
    "--config.cluster.eps=0.5",
    "--workdir",
    "w",
  ]
  assert main._resolve_config_argument(["prog", "--config=msmt17_cam:x", "--", "--config"]) == [
    "prog",
    f"--config={path}:x",
    "--",
    "--config",
  ]
  with pytest.raises(SystemExit) as info:
    main.parse_flags(["prog", "--config=markt1501", "--workdir", "w"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(
    "error: --config markt1501: no such file and no recipe of that name; "
    "did you mean market1501?\nRecipes: custom, demo,"
  ), err
