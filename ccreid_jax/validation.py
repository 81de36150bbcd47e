"""Checks a run's config before anything is loaded, compiled or written.

``validate_config(config, num_devices=...)`` walks the config against the tree of
``configs/default.py`` (unknown fields, wrong types) and then checks the values that
cannot work (a batch that does not split into identities or devices, a DBSCAN radius
outside the Jaccard range, unknown model or dataset names, a missing dataset folder, ...).
Every problem is collected and reported together in one ``ConfigError``, one line each,
naming the field and what it accepts.
"""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any, Callable

import ml_collections

from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.models import resnet as resnet_lib

__all__ = ["ConfigError", "default_config", "validate_config"]

CLUSTER_METHODS: tuple[str, ...] = ("dbscan", "infomap")
POOLINGS: tuple[str, ...] = ("gem", "avg")
# The ResNet downsamples by 16 * last_stride: a smaller side leaves a map of only padding.
MIN_SIDE_PER_STRIDE = 16


class ConfigError(ValueError):
  """The config cannot run; the message lists every problem, one line each."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    count = len(self.problems)
    header = f"Invalid config ({count} problem{'s' if count != 1 else ''}):"
    super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))


def default_config() -> ml_collections.ConfigDict | None:
  """``configs.default.get_config()``, or None when the ``configs`` folder is not importable.

  ``configs/`` sits next to the package (the command line puts the working directory on
  ``sys.path``); an installed package used from elsewhere has no reference tree.
  """
  try:
    module = importlib.import_module("configs.default")
  except ImportError:
    return None
  return module.get_config()


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
  for key in config.keys():
    path = f"{prefix}.{key}"
    value = config[key]
    if key not in reference:
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

  def number(self, path: str, ok: Callable[[float], bool], accepted: str,
             why: str = "") -> Any:
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


def _check_values(config: Any, num_devices: int | None, problems: list[str]) -> None:
  c = _Checker(config, problems)

  # data
  name = c.choice("data.name", datasets_lib.DATASET_NAMES, lower=True)
  stride = c.get("model.last_stride", int)
  stride = stride if stride in (1, 2) else 2
  for side in ("data.height", "data.width"):
    c.integer(side, MIN_SIDE_PER_STRIDE * stride,
              f"the ResNet downsamples by {MIN_SIDE_PER_STRIDE * stride} with "
              f"model.last_stride={stride}")
  c.integer("data.num_workers", 0)
  c.choice("data.source", ("folder", "tfds"))
  root = c.get("data.root", str)
  if root is not _MISSING:
    full = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(full):
      folder = (datasets_lib.dataset_folder_name(name)
                if isinstance(name, str) and name.lower() in datasets_lib.DATASET_NAMES
                else "<dataset folder>")
      c.fail("data.root", root,
             f"dataset root {full!r} does not exist; set it with "
             f"--config.data.root=/path/to/datasets (the folder that holds {folder}/, "
             "or that folder itself)")

  # model
  c.choice("model.depth", tuple(sorted(resnet_lib._ARCHS)))  # pylint: disable=protected-access
  c.choice("model.pooling", POOLINGS)
  c.choice("model.dtype", tuple(sorted(resnet_lib._DTYPES)))  # pylint: disable=protected-access
  c.integer("model.width", 1)
  c.choice("model.last_stride", (1, 2))
  c.integer("model.bn_group_size", 1)
  pretrained = c.get("model.pretrained", str)
  if pretrained not in (_MISSING, "") and not os.path.isfile(os.path.expanduser(pretrained)):
    c.fail("model.pretrained", pretrained, "file not found (use '' for a random init)")

  # train
  batch = c.integer("train.batch_size", 1)
  instances = c.integer("train.num_instances", 1)
  c.integer("train.epochs", 0)
  c.integer("train.iters", 1)
  c.integer("train.log_every", 1)
  c.integer("train.eval_every", 1)
  if batch is not _MISSING and instances is not _MISSING and batch >= 1 and instances >= 1:
    if batch % instances:
      c.fail("train.batch_size", batch,
             f"must be a multiple of config.train.num_instances={instances} "
             "(a batch is P identities x K instances)")
  if batch is not _MISSING and batch >= 1 and num_devices is not None and batch % num_devices:
    c.fail("train.batch_size", batch,
           f"must be a multiple of the device count ({num_devices}); the batch is split "
           "evenly over the devices")

  # optim
  c.number("optim.lr", lambda v: v > 0, "> 0")
  c.number("optim.weight_decay", lambda v: v >= 0, ">= 0")
  c.integer("optim.step_size", 1)
  c.number("optim.gamma", lambda v: v > 0, "> 0")

  # memory
  c.number("memory.temperature", lambda v: v > 0, "> 0", "it divides the logits")
  c.number("memory.momentum", lambda v: 0 <= v < 1, "in [0, 1)",
           "1 would freeze the centroids")
  c.integer("memory.min_bucket", 1)

  # cluster
  c.choice("cluster.method", CLUSTER_METHODS)
  c.number("cluster.eps", lambda v: 0 < v < 1, "in (0, 1)",
           "Jaccard distances lie in [0, 1] and absent pairs are 1.0, so eps >= 1 links "
           "every pair and eps <= 0 links none")
  c.integer("cluster.min_samples", 1)
  k1 = c.integer("cluster.k1", 1)
  k2 = c.integer("cluster.k2", 1)
  if k1 is not _MISSING and k2 is not _MISSING and k2 > k1:
    c.fail("cluster.k2", k2, f"must be <= config.cluster.k1={k1} (query expansion uses the "
                              "k2 nearest of the k1 neighbours)")
  c.integer("cluster.infomap_k", 2)
  c.number("cluster.infomap_min_similarity", lambda v: -1 <= v <= 1, "in [-1, 1]",
           "a cosine similarity")
  c.integer("cluster.infomap_min_cluster_size", 1)

  # rlcc
  c.number("rlcc.alpha", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.number("rlcc.beta", lambda v: 0 <= v <= 1, "in [0, 1]")
  c.number("rlcc.pred_temp", lambda v: v > 0, "> 0")

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
  if (which is not _MISSING and which not in ("best", "latest", "init")
      and not (isinstance(which, str) and os.path.isdir(which))):
    try:
      int(which)
    except ValueError:
      c.fail("eval.checkpoint", which,
             "accepted: 'best', 'latest', 'init', a step number or a step folder")


def validate_config(config: Any, *, num_devices: int | None,
                    reference: ml_collections.ConfigDict | None = None) -> None:
  """Raises ``ConfigError`` listing every problem of ``config``; returns None when it can run.

  Args:
    config: the run's ``ConfigDict`` (or a nested dict of the same shape).
    num_devices: devices the batch is split over (``jax.device_count()``); None skips the
      divisibility check (evaluation only).
    reference: the tree of every known field with its default; default
      ``configs.default.get_config()``. When neither is available only values are checked.
  """
  problems: list[str] = []
  reference = default_config() if reference is None else reference
  if reference is not None:
    _walk(config, reference, "config", problems)
  _check_values(config, num_devices, problems)
  if problems:
    raise ConfigError(problems)
