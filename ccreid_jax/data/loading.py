"""The images a run needs, decoded once: ``load_run_data(config, workdir, need_train=...)``.

Reads the dataset named by ``config.data`` (an image folder in one of the known layouts, a
TFDS build of one, or with ``data.name = "folder"`` any folder of the user's own images) and
its uint8 image cache (``data.cache_dir`` or ``<workdir>/cache``). With
``config.eval.dataset`` / ``config.eval.root`` set, query and gallery come from that dataset
instead (cross-domain evaluation). A folder dataset is evaluated on the list file
``config.eval.list``, on ``eval.dataset``, or not at all (``RunData.has_eval`` is False).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import ml_collections
import numpy as np

from ccreid_jax.data import cache as cache_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data import tfds_data
from ccreid_jax.errors import ConfigError
from ccreid_jax.utils import printable

__all__ = ["RunData", "load_run_data", "train_fingerprint"]

logger = logging.getLogger("ccreid_jax")


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run's records and decoded images.

  Attributes:
    dataset: the training dataset (its ``train`` records; with no separate evaluation
      dataset also its query and gallery).
    train_images: (N, H, W, 3) uint8 rows aligned with ``dataset.train``, or None when the
      train split was not loaded.
    eval_dataset: the dataset whose query and gallery are evaluated (with no evaluation,
      ``dataset`` itself, whose query and gallery are empty).
    test_images: (Q + G, H, W, 3) uint8: ``eval_dataset``'s query images, then its gallery;
      None when there is nothing to evaluate (``has_eval`` is False).
    cross_domain: whether ``eval_dataset`` is another dataset than ``dataset``.
    train_fingerprint: ``train_fingerprint(dataset.train)``, computed when the data is loaded
      (None when the train split was not loaded).
  """

  dataset: datasets_lib.ReidDataset
  train_images: np.ndarray | None
  eval_dataset: datasets_lib.ReidDataset
  test_images: np.ndarray | None
  cross_domain: bool
  train_fingerprint: str | None = None

  @property
  def num_train(self) -> int:
    return len(self.dataset.train)

  @property
  def has_eval(self) -> bool:
    """Whether a query / gallery is there to evaluate (a folder dataset may have none)."""
    return self.test_images is not None

  @property
  def has_train_identities(self) -> bool:
    """Whether the train identities are known (benchmarks; not a folder of own images)."""
    return self.dataset.has_train_identities

  @property
  def has_train_cameras(self) -> bool:
    """Whether the train cameras mean something (False: a folder read without cameras,
    every camera 0)."""
    return self.dataset.has_cameras

  @property
  def train_cameras(self) -> np.ndarray:
    """(N,) int64 camera of each train image (all 0 without ``has_train_cameras``)."""
    return np.array([r.camera for r in self.dataset.train], np.int64)

  @property
  def train_identities(self) -> np.ndarray | None:
    """(N,) int64 identity of each train image (never used for training, diagnostics only),
    or None when they are not known (``has_train_identities`` is False)."""
    if not self.has_train_identities:
      return None
    return np.array([r.identity for r in self.dataset.train], np.int64)


def train_fingerprint(records) -> str:
  """A short hash of a train split: each image's last two path parts, identity and camera, in
  order.

  The same images read from another root folder, or from a TFDS build of the folder, give the
  same fingerprint; another image list gives another one. Paths are hashed as the bytes the
  file system gave (UTF-8 with ``surrogateescape``, ``os.fsencode``'s bytes on a UTF-8 file
  system): a name that is not valid UTF-8 hashes its own bytes, and UTF-8 names hash as they
  always did, so existing workdirs keep their fingerprint.
  """
  digest = hashlib.sha256()
  for record in records:
    parts = str(record.path).replace(os.sep, "/").split("/")[-2:]
    digest.update(
      f"{'/'.join(parts)}\t{int(record.identity)}\t{int(record.camera)}\n".encode(
        "utf-8", "surrogateescape"
      )
    )
  return digest.hexdigest()[:16]


def _is_utf8(path: str) -> bool:
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _report_names_not_utf8(dataset: datasets_lib.ReidDataset) -> None:
  """Logs (at load time) the image paths whose bytes are not valid UTF-8.

  Python gives such names with their bytes as lone surrogates (``os.fsdecode``); they are
  read, hashed and written losslessly: JSON escapes them (``\\udcXX``), feature files keep them
  (``os.fsencode(path)`` gives the bytes back) and printed text shows ``\\xNN``.
  """
  records = [*dataset.train, *dataset.query, *dataset.gallery]
  odd = [str(r.path) for r in records if not _is_utf8(str(r.path))]
  if odd:
    listed = ", ".join(printable(p) for p in odd[:3]) + (", ..." if len(odd) > 3 else "")
    logger.warning(
      "dataset %s: %d image path(s) are not valid UTF-8 (%s); they are used as "
      "they are: caches and fingerprints hash their bytes, JSON files escape them, "
      "feature files keep them (os.fsencode(path) gives the bytes)",
      dataset.name,
      len(odd),
      listed,
    )


def _read_records(
  config: ml_collections.ConfigDict, name: str, root: str
) -> datasets_lib.ReidDataset:
  """The records of a dataset folder: a known layout, or a folder of own images."""
  data = config.data
  if name.lower() != datasets_lib.FOLDER_NAME:
    return datasets_lib.load_dataset(
      name,
      root,
      skip_bad_names=data.skip_bad_names,
      allow_outside_links=data.follow_symlinks_outside,
    )
  return datasets_lib.load_folder_dataset(
    root,
    cameras=data.cameras,
    camera_folder_level=data.camera_folder_level,
    camera_regex=data.camera_regex,
    eval_list=config.eval.list,
    skip_bad_names=data.skip_bad_names,
    allow_outside_links=data.follow_symlinks_outside,
    min_images=_min_images(config),
  )


def _min_images(config: ml_collections.ConfigDict) -> int:
  return datasets_lib.folder_min_images(config.train.num_instances, config.cluster.min_samples)


def _load(
  config: ml_collections.ConfigDict, name: str, root: str, cache_dir: str, *, need_train: bool
):
  """``(dataset, train images or None, test images or None)``."""
  data = config.data
  progress = bool(config.log.progress)
  if data.source == "tfds":  # root is the TFDS data_dir of a tfds_data build.
    return tfds_data.load_tfds_dataset_images(
      name,
      root,
      data.height,
      data.width,
      cache_dir,
      need_train=need_train,
      progress=progress,
      num_workers=data.num_workers,
    )
  dataset = _read_records(config, name, root)
  dataset, train_images, test_images = cache_lib.load_dataset_images(
    dataset,
    data.height,
    data.width,
    cache_dir,
    need_train=need_train,
    skip_bad_images=data.skip_bad_images,
    progress=progress,
    num_workers=data.num_workers,
  )
  if dataset.name == datasets_lib.FOLDER_NAME and need_train:
    datasets_lib.check_folder_size(len(dataset.train), _min_images(config), dataset.root)
  return dataset, train_images, test_images if dataset.has_eval else None


def _check_something_to_evaluate(config: ml_collections.ConfigDict) -> None:
  if config.data.name.lower() == datasets_lib.FOLDER_NAME and not (
    config.eval.list or config.eval.dataset
  ):
    raise ConfigError(
      [
        "config.eval.list = '': a folder dataset (config.data.name = 'folder') has no query / "
        "gallery to evaluate; give a list file of labelled images "
        "(--config.eval.list=list.txt, lines 'query|gallery <path> <identity> <camera>') or a "
        "labelled dataset (--config.eval.dataset=<name> --config.eval.root=<folder>)"
      ]
    )


def load_run_data(config: ml_collections.ConfigDict, workdir: str, *, need_train: bool) -> RunData:
  """Loads the datasets of ``config`` (train split only when ``need_train``).

  Raises:
    ConfigError: nothing to load: no train split asked for and a folder dataset without
      evaluation images.
    DatasetError, ImageDecodeError: from the dataset readers and the image cache.
  """
  if not need_train:
    _check_something_to_evaluate(config)
  cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")
  eval_name = config.eval.dataset or config.data.name
  eval_root = config.eval.root or config.data.root
  cross_domain = (eval_name, eval_root) != (config.data.name, config.data.root)
  if not cross_domain:
    dataset, train_images, test_images = _load(
      config, config.data.name, config.data.root, cache_dir, need_train=need_train
    )
    eval_dataset = dataset
  else:
    eval_dataset, _, test_images = _load(config, eval_name, eval_root, cache_dir, need_train=False)
    dataset, train_images = eval_dataset, None
    if need_train:
      dataset, train_images, _ = _load(
        config, config.data.name, config.data.root, cache_dir, need_train=True
      )
  _report_names_not_utf8(dataset)
  if eval_dataset is not dataset:
    _report_names_not_utf8(eval_dataset)
  fingerprint = train_fingerprint(dataset.train) if need_train else None
  return RunData(
    dataset,
    train_images,
    eval_dataset,
    test_images,
    cross_domain=cross_domain,
    train_fingerprint=fingerprint,
  )
