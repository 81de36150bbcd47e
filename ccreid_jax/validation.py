"""Checks a run's config before anything is loaded, compiled or written.

``validate_config(config, num_devices=...)`` walks the config against the tree of
``ccreid_jax.configs.default`` (unknown fields, wrong types) and then checks the values that
cannot work (a batch that does not split into identities or devices, a DBSCAN radius
outside the Jaccard range, unknown model or dataset names, a missing dataset folder, ...).
Every problem is collected and reported together in one ``ConfigError``, one line each,
naming the field and what it accepts.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from ccreid_jax import memory as memory_lib
from ccreid_jax import pseudo_labels
from ccreid_jax.configs import default as default_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.errors import ConfigError
from ccreid_jax.models import resnet as resnet_lib

__all__ = [
  "REPLACED_FIELDS",
  "ConfigError",
  "check_cluster_sizes",
  "default_config",
  "validate_config",
]

CLUSTER_METHODS: tuple[str, ...] = pseudo_labels.CLUSTER_METHODS
CLUSTER_DISTANCES: tuple[str, ...] = pseudo_labels.CLUSTER_DISTANCES
POOLINGS: tuple[str, ...] = resnet_lib.POOLINGS
PRECISIONS: tuple[str, ...] = ("default", "float32")
KERNELS: tuple[str, ...] = resnet_lib.KERNELS
# ``model.pretrained`` value that asks for a random initialisation on purpose.
NO_PRETRAINED = "none"
# The ImageNet files the published recipes start from (torchvision IMAGENET1K_V1 names; older
# torchvision releases saved the same weights as resnet50-19c8e357.pth and so on).
IMAGENET_FILES: dict[tuple[int, bool], str] = {
  (18, False): "resnet18-f37072fd.pth",
  (34, False): "resnet34-b627a593.pth",
  (50, False): "resnet50-19c8e357.pth",
  (101, False): "resnet101-63fe2227.pth",
  (50, True): "resnet50_ibn_a.pth.tar",
  (101, True): "resnet101_ibn_a.pth.tar",
}
# The ResNet downsamples by 16 * last_stride: a smaller side leaves a map of only padding.
MIN_SIDE_PER_STRIDE = 16
MEMORY_UPDATE_RULES: tuple[str, ...] = memory_lib.UPDATE_RULES
# Fields that no longer exist, and what took their place (the old spelling is refused with it).
# A run saved with them still resumes: run.upgrade_saved_config rewrites its config.json.
REPLACED_FIELDS: dict[str, str] = {
  "memory.hard": "this field was replaced by config.memory.update_rule: memory.hard=True is "
  'now --config.memory.update_rule=hard (config.memory.update_rule = "hard" '
  'in a config file), and False is "momentum", the default',
}


def default_config() -> ml_collections.ConfigDict:
  """``ccreid_jax.configs.default.get_config()``: every field of a run, with its default."""
  return default_lib.get_config()


# ---------------------------------------------------------------------------------------
# Schema: unknown fields and wrong types.
# ---------------------------------------------------------------------------------------


def _is_tree(value: Any) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _type_name(value: Any) -> str:
  if _is_tree(value):
    return "a group of fields"
  return type(value).__name__


def _type_ok(expected: Any, value: Any) -> bool:
  """Whether ``value`` may replace the default ``expected`` (ints are accepted as floats)."""
  if expected is None:
    return True
  if isinstance(expected, bool):
    return isinstance(value, bool)
  if isinstance(expected, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(expected, str):
    return isinstance(value, str)
  if isinstance(expected, (list, tuple)):
    return isinstance(value, (list, tuple))
  if _is_tree(expected):
    return _is_tree(value)
  return isinstance(value, type(expected))


def _walk(config: Any, reference: Any, prefix: str, problems: list[str]) -> None:
  known = list(reference.keys())
  for key in config:
    path = f"{prefix}.{key}"
    value = config[key]
    if key not in reference:
      replaced = REPLACED_FIELDS.get(path.partition(".")[2])
      if replaced is not None:
        problems.append(f"{path}: {replaced}")
        continue
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"did you mean {prefix}.{close[0]}? " if close else ""
      problems.append(f"{path}: unknown field; {hint}fields of {prefix}: {', '.join(known)}")
      continue
    expected = reference[key]
    if not _type_ok(expected, value):
      want = "int or float" if isinstance(expected, float) else _type_name(expected)
      problems.append(f"{path} = {value!r}: expected {want}, got {_type_name(value)}")
      continue
    if _is_tree(expected):
      _walk(value, expected, path, problems)
  for key in known:
    if key not in config:
      problems.append(f"{prefix}.{key}: missing field (default {reference[key]!r})")


# ---------------------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------------------

_MISSING = object()


class _Checker:
  """Reads fields and collects problems; a missing or mistyped field is never re-reported."""

  def __init__(self, config: Any, problems: list[str]):
    self.config = config
    self.problems = problems

  def get(self, path: str, kind: type | tuple[type, ...]) -> Any:
    node = self.config
    for part in path.split("."):
      if not _is_tree(node) or part not in node:
        return _MISSING
      node = node[part]
    if isinstance(node, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
      return _MISSING
    return node if isinstance(node, kind) else _MISSING

  def number(self, path: str, ok: Callable[[float], bool], accepted: str, why: str = "") -> Any:
    value = self.get(path, (int, float))
    if value is not _MISSING and not ok(value):
      self.fail(path, value, f"must be {accepted}" + (f" ({why})" if why else ""))
    return value

  def integer(self, path: str, minimum: int, why: str = "") -> Any:
    value = self.get(path, int)
    if value is not _MISSING and value < minimum:
      self.fail(path, value, f"must be >= {minimum}" + (f" ({why})" if why else ""))
    return value

  def choice(self, path: str, accepted: tuple[Any, ...], *, lower: bool = False) -> Any:
    value = self.get(path, type(accepted[0]))
    if value is _MISSING:
      return value
    probe = value.lower() if lower and isinstance(value, str) else value
    if probe not in accepted:
      self.fail(path, value, f"unknown value; accepted: {', '.join(repr(a) for a in accepted)}")
    return value

  def fail(self, path: str, value: Any, message: str) -> None:
    self.problems.append(f"config.{path} = {value!r}: {message}")


def _missing_weights_message(c: _Checker) -> str:
  """What to do when a training run names no backbone weights."""
  arch = c.get("model.arch", str)
  depth = c.get("model.depth", int)
  try:
    key = resnet_lib.parse_arch(
      arch if arch is not _MISSING else "resnet", depth if depth is not _MISSING else None
    )
  except ValueError:
    key = (50, False)
  name = IMAGENET_FILES.get(key, IMAGENET_FILES[(50, False)])
  source = (
    "IBN-Net's ImageNet release" if key[1] else "torchvision's ImageNet weights, IMAGENET1K_V1"
  )
  return (
    f"no backbone weights. Every published recipe starts from ImageNet: get {name} "
    f"({source}), put it in weights/ and pass --config.model.pretrained=weights/{name}. "
    f"To train from a random initialisation on purpose (a different recipe, far below "
    f"the published mAP), pass --config.model.pretrained={NO_PRETRAINED}"
  )


def _check_folder_fields(c: _Checker, folder_dataset: bool) -> None:
  """The fields of a folder of own images (``data.name = "folder"``): cameras, the evaluation
  list, and the camera-aware options that need cameras."""
  cameras = c.choice("data.cameras", datasets_lib.CAMERA_SOURCES)
  c.integer("data.camera_folder_level", 1)
  regex = c.get("data.camera_regex", str)
  if cameras == "regex" and regex is not _MISSING:
    try:
      if not re.compile(regex).pattern:
        c.fail(
          "data.camera_regex",
          regex,
          "is empty; give a regular expression whose group 1 "
          r"is the camera in the file name, e.g. 'c(\d+)'",
        )
    except re.error as exc:
      c.fail("data.camera_regex", regex, f"is not a regular expression: {exc}")
  eval_list = c.get("eval.list", str)
  eval_name = c.get("eval.dataset", str)
  if eval_list not in (_MISSING, ""):
    if not folder_dataset:
      c.fail(
        "eval.list",
        eval_list,
        "is read for config.data.name='folder' only (a "
        "benchmark is evaluated on its own query / gallery)",
      )
    elif not os.path.isfile(os.path.expanduser(eval_list)):
      c.fail(
        "eval.list",
        eval_list,
        "file not found (one line per image: 'query|gallery <path> <identity> <camera>')",
      )
    if eval_name not in (_MISSING, ""):
      c.fail(
        "eval.list",
        eval_list,
        f"and config.eval.dataset={eval_name!r} both name the evaluation images; set one of them",
      )
  if not folder_dataset:
    return
  if c.get("data.source", str) == "tfds":
    c.fail(
      "data.source",
      "tfds",
      "a folder dataset (config.data.name='folder') is read from "
      "its image files; use config.data.source='folder'",
    )
  eval_root = c.get("eval.root", str)
  if eval_root not in (_MISSING, "") and eval_name in (_MISSING, ""):
    c.fail(
      "eval.root",
      eval_root,
      "names the folder of config.eval.dataset, which is not set; "
      "with config.data.name='folder' set config.eval.dataset to the layout of the "
      "evaluation images, or list them in config.eval.list",
    )
  if cameras != "none":
    return
  no_cameras = (
    "camera-aware training needs the cameras, and config.data.cameras='none' gives "
    "every image of the folder dataset (config.data.name='folder') camera 0; read "
    "them with config.data.cameras='folder' (and config.data.camera_folder_level) "
    "or 'regex' (and config.data.camera_regex), or turn this off"
  )
  if c.get("cluster.distance", str) == "ca_jaccard":
    c.fail("cluster.distance", "ca_jaccard", f"{no_cameras} (config.cluster.distance='jaccard')")
  if c.get("camera.enabled", bool) is True:
    c.fail("camera.enabled", True, f"{no_cameras} (config.camera.enabled=False)")


def _check_values(
  config: Any, num_devices: int | None, problems: list[str], *, training: bool = False
) -> None:
  c = _Checker(config, problems)

  # data
  name = c.choice("data.name", datasets_lib.DATASET_NAMES + (datasets_lib.FOLDER_NAME,), lower=True)
  folder_dataset = isinstance(name, str) and name.lower() == datasets_lib.FOLDER_NAME
  stride = c.get("model.last_stride", int)
  stride = stride if stride in (1, 2) else 2
  for side in ("data.height", "data.width"):
    c.integer(
      side,
      MIN_SIDE_PER_STRIDE * stride,
      f"the ResNet downsamples by {MIN_SIDE_PER_STRIDE * stride} with model.last_stride={stride}",
    )
  c.integer("data.num_workers", 0)
  c.choice("data.source", ("folder", "tfds"))
  root = c.get("data.root", str)
  if root is not _MISSING:
    full = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(full):
      folder = (
        datasets_lib.dataset_folder_name(name)
        if isinstance(name, str) and name.lower() in datasets_lib.DATASET_NAMES
        else "<dataset folder>"
      )
      holds = (
        "the folder of your training images"
        if folder_dataset
        else f"the folder that holds {folder}/, or that folder itself"
      )
      c.fail(
        "data.root",
        root,
        f"dataset root {full!r} does not exist; set it with "
        f"--config.data.root=/path/to/datasets ({holds})",
      )
  _check_folder_fields(c, folder_dataset)

  # model
  c.choice("model.depth", tuple(sorted(resnet_lib.ARCHS)))
  c.choice("model.pooling", POOLINGS)
  c.choice("model.dtype", tuple(sorted(resnet_lib.DTYPES)))
  c.integer("model.width", 1)
  c.choice("model.last_stride", (1, 2))
  c.integer("model.bn_group_size", 1)
  c.choice("model.precision", PRECISIONS)
  c.choice("model.kernels", KERNELS)
  pretrained = c.get("model.pretrained", str)
  if pretrained not in (_MISSING, "", NO_PRETRAINED) and not os.path.isfile(
    os.path.expanduser(pretrained)
  ):
    c.fail(
      "model.pretrained",
      pretrained,
      f"file not found (use {NO_PRETRAINED!r} to train from a random initialisation)",
    )
  if training and pretrained == "":
    c.fail("model.pretrained", pretrained, _missing_weights_message(c))

  # train
  batch = c.integer("train.batch_size", 1)
  instances = c.integer("train.num_instances", 1)
  c.integer("train.epochs", 0)
  c.integer("train.iters", 1)
  c.integer("train.log_every", 1)
  c.integer("train.eval_every", 1)
  if (
    batch is not _MISSING
    and instances is not _MISSING
    and batch >= 1
    and instances >= 1
    and batch % instances
  ):
    c.fail(
      "train.batch_size",
      batch,
      f"must be a multiple of config.train.num_instances={instances} "
      "(a batch is P identities x K instances)",
    )
  if batch is not _MISSING and batch >= 1 and num_devices is not None and batch % num_devices:
    c.fail(
      "train.batch_size",
      batch,
      f"must be a multiple of the device count ({num_devices}); the batch is split "
      "evenly over the devices",
    )

  # optim
  c.number("optim.lr", lambda v: v > 0, "> 0")
  c.number("optim.weight_decay", lambda v: v >= 0, ">= 0")
  c.integer("optim.step_size", 1)
  c.number("optim.gamma", lambda v: v > 0, "> 0")

  # memory
  c.number("memory.temperature", lambda v: v > 0, "> 0", "it divides the logits")
  c.number("memory.momentum", lambda v: 0 <= v < 1, "in [0, 1)", "1 would freeze the centroids")
  c.integer("memory.min_bucket", 1)
  c.choice("memory.update_rule", MEMORY_UPDATE_RULES)
  c.number("memory.bmw_pull", lambda v: v >= 0, ">= 0", "the weight of BMW's pull")
  c.number("memory.bmw_push", lambda v: v >= 0, ">= 0", "the weight of BMW's push")

  # cluster
  method = c.choice("cluster.method", CLUSTER_METHODS)
  distance = c.choice("cluster.distance", CLUSTER_DISTANCES)
  jaccard_range = (
    "Jaccard distances lie in [0, 1] and absent pairs are 1.0, so eps >= 1 links "
    "every pair and eps <= 0 links none"
  )
  eps = c.number("cluster.eps", lambda v: 0 < v < 1, "in (0, 1)", jaccard_range)
  reliable = c.get("cluster.reliable", bool)
  tight = c.number("cluster.eps_tight", lambda v: 0 < v < 1, "in (0, 1)", jaccard_range)
  loose = c.number("cluster.eps_loose", lambda v: 0 < v < 1, "in (0, 1)", jaccard_range)
  if reliable is True and _MISSING not in (eps, tight, loose) and not tight < eps < loose:
    c.fail(
      "cluster.eps_tight",
      tight,
      f"the reliability criterion needs eps_tight < eps < eps_loose, got {tight} / {eps} / {loose}",
    )
  if reliable is True and method == "infomap":
    c.fail(
      "cluster.reliable",
      reliable,
      "the reliability criterion runs DBSCAN at three radii; "
      "it needs config.cluster.method='dbscan'",
    )
  if distance == "ca_jaccard" and method == "infomap":
    c.fail(
      "cluster.distance",
      distance,
      "InfoMap clusters a kNN graph, not a distance; "
      "'ca_jaccard' needs config.cluster.method='dbscan'",
    )
  for field in (
    "ca_k1_intra",
    "ca_k1_inter",
    "ca_k2_intra",
    "ca_k2_inter",
    "ca_k2_intra_first",
    "ca_k2_inter_first",
  ):
    c.integer(f"cluster.{field}", 1)
  c.integer("cluster.infomap_seed", 0)
  c.integer("cluster.min_samples", 1)
  k1 = c.integer("cluster.k1", 1)
  k2 = c.integer("cluster.k2", 1)
  if k1 is not _MISSING and k2 is not _MISSING and k2 > k1:
    c.fail(
      "cluster.k2",
      k2,
      f"must be <= config.cluster.k1={k1} (query expansion uses the "
      "k2 nearest of the k1 neighbours)",
    )
  c.integer("cluster.infomap_k", 2)
  c.number(
    "cluster.infomap_min_similarity", lambda v: -1 <= v <= 1, "in [-1, 1]", "a cosine similarity"
  )
  c.integer("cluster.infomap_min_cluster_size", 1)

  # rlcc
  c.number("rlcc.alpha", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.number("rlcc.beta", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.number("rlcc.pred_temp", lambda v: v > 0, "> 0")

  # camera
  c.number("camera.weight", lambda v: v >= 0, ">= 0")
  c.number("camera.temperature", lambda v: v > 0, "> 0", "it divides the logits")
  c.integer("camera.num_hard_negatives", 0)
  c.number("camera.momentum", lambda v: 0 <= v <= 1, "in [0, 1]", "1 keeps the proxies fixed")
  c.integer("camera.min_bucket", 1)
  c.integer("camera.start_epoch", 0)

  # augment
  c.number("augment.flip_prob", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.number("augment.erasing_prob", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.integer("augment.pad", 0)

  # eval
  c.integer("eval.batch_size", 1)
  c.choice("eval.dataset", ("",) + tuple(datasets_lib.DATASET_NAMES), lower=True)
  eval_root = c.get("eval.root", str)
  if eval_root not in (_MISSING, "") and not os.path.isdir(os.path.expanduser(eval_root)):
    c.fail("eval.root", eval_root, "is not a folder")
  c.integer("log.ranklist_queries", 0)
  c.integer("log.ranklist_topk", 1)
  which = c.get("eval.checkpoint", (str, int))
  if (
    which is not _MISSING
    and which not in ("best", "latest", "init")
    and not (isinstance(which, str) and os.path.isdir(which))
  ):
    try:
      int(which)
    except ValueError:
      c.fail(
        "eval.checkpoint",
        which,
        "accepted: 'best', 'latest', 'init', a checkpoint number or a checkpoint folder",
      )


def check_cluster_sizes(cluster: ml_collections.ConfigDict, num_train: int) -> None:
  """Raises ``ConfigError`` for clustering sizes that ``num_train`` images cannot hold.

  A kNN neighbourhood of every image (Jaccard's ``k1``, CA-Jaccard's ``ca_k1_*``, InfoMap's
  ``infomap_k``) puts all images in one cluster, whose one-class contrastive loss is 0;
  DBSCAN's ``min_samples`` above half the images leaves room for one cluster at most (none
  above the count). Checked once the train images are known, before anything trains.
  """
  n = int(num_train)
  problems = []

  def neighbours(field: str, value: int) -> None:
    if value >= n:
      problems.append(
        f"config.cluster.{field} = {value}: must be below the {n} train images (a "
        f"neighbourhood of all {n} images puts every image in one cluster: the loss is 0 "
        f"and nothing is learnt); set --config.cluster.{field}=<at most {max(1, n - 1)}>"
        " (the recipes use 20-30 for thousands of images)"
      )

  if cluster.method == "infomap":
    neighbours("infomap_k", int(cluster.infomap_k))
  else:
    if cluster.distance == "ca_jaccard":
      for field in ("ca_k1_intra", "ca_k1_inter"):
        neighbours(field, int(cluster[field]))
    else:
      neighbours("k1", int(cluster.k1))
    min_samples = int(cluster.min_samples)
    if 2 * min_samples > n:
      problems.append(
        f"config.cluster.min_samples = {min_samples}: DBSCAN needs at most half of the {n} "
        "train images for two clusters (above the count it finds no cluster in any epoch); "
        f"set --config.cluster.min_samples=<at most {max(1, n // 2)}> (the recipes use 4)"
      )
  if problems:
    raise ConfigError(problems)


def validate_config(
  config: Any,
  *,
  num_devices: int | None,
  training: bool = False,
  reference: ml_collections.ConfigDict | None = None,
) -> None:
  """Raises ``ConfigError`` listing every problem of ``config``; returns None when it can run.

  Args:
    config: the run's ``ConfigDict`` (or a nested dict of the same shape).
    num_devices: devices the batch is split over (``jax.device_count()``); None skips the
      divisibility check (evaluation only).
    training: the config is about to train: ``model.pretrained`` must name a weights file, or
      be ``"none"`` for a random initialisation on purpose.
    reference: the tree of every known field with its default; default
      ``ccreid_jax.configs.default.get_config()``.
  """
  problems: list[str] = []
  reference = default_config() if reference is None else reference
  _walk(config, reference, "config", problems)
  _check_values(config, num_devices, problems, training=training)
  if problems:
    raise ConfigError(problems)
