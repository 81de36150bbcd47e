"""The images a run needs, decoded once: ``load_run_data(config, workdir, need_train=...)``.

Reads the dataset named by ``config.data`` (an image folder in one of the known layouts, or a
TFDS build of one) and its uint8 image cache (``data.cache_dir`` or ``<workdir>/cache``).
With ``config.eval.dataset`` / ``config.eval.root`` set, query and gallery come from that
dataset instead (cross-domain evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import ml_collections
import numpy as np

from ccreid_jax.data import cache as cache_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data import tfds_data

__all__ = ["RunData", "load_run_data", "train_fingerprint"]


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run's records and decoded images.

  Attributes:
    dataset: the training dataset (its ``train`` records; with no separate evaluation
      dataset also its query and gallery).
    train_images: (N, H, W, 3) uint8 rows aligned with ``dataset.train``, or None when the
      train split was not loaded.
    eval_dataset: the dataset whose query and gallery are evaluated.
    test_images: (Q + G, H, W, 3) uint8: ``eval_dataset``'s query images, then its gallery.
    cross_domain: whether ``eval_dataset`` is another dataset than ``dataset``.
  """

  dataset: datasets_lib.ReidDataset
  train_images: np.ndarray | None
  eval_dataset: datasets_lib.ReidDataset
  test_images: np.ndarray
  cross_domain: bool

  @property
  def num_train(self) -> int:
    return len(self.dataset.train)

  @property
  def train_cams(self) -> np.ndarray:
    return np.array([r.camid for r in self.dataset.train], np.int64)

  @property
  def train_ids(self) -> np.ndarray:
    return np.array([r.pid for r in self.dataset.train], np.int64)


def train_fingerprint(records) -> str:
  """A short hash of a train split: each image's last two path parts, id and camera, in order.

  The same images read from another root folder, or from a TFDS build of the folder, give the
  same fingerprint; another image list gives another one.
  """
  digest = hashlib.sha256()
  for record in records:
    parts = str(record.path).replace(os.sep, "/").split("/")[-2:]
    digest.update(f"{'/'.join(parts)}\t{int(record.pid)}\t{int(record.camid)}\n".encode())
  return digest.hexdigest()[:16]


def _load(config: ml_collections.ConfigDict, name: str, root: str, cache_dir: str, *,
          need_train: bool):
  data = config.data
  progress = bool(config.log.progress)
  if data.source == "tfds":  # root is the TFDS data_dir of a tfds_data build.
    return tfds_data.load_tfds_dataset_images(
        name, root, data.height, data.width, cache_dir, need_train=need_train,
        progress=progress, num_workers=data.num_workers)
  dataset = datasets_lib.load_dataset(name, root, skip_bad_names=data.skip_bad_names,
                                      allow_outside_links=data.follow_symlinks_outside)
  return cache_lib.load_dataset_images(
      dataset, data.height, data.width, cache_dir, need_train=need_train,
      skip_bad_images=data.skip_bad_images, progress=progress, num_workers=data.num_workers)


def load_run_data(config: ml_collections.ConfigDict, workdir: str, *,
                  need_train: bool) -> RunData:
  """Loads the datasets of ``config`` (train split only when ``need_train``)."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")
  eval_name = config.eval.dataset or config.data.name
  eval_root = config.eval.root or config.data.root
  cross_domain = (eval_name, eval_root) != (config.data.name, config.data.root)
  if not cross_domain:
    dataset, train_images, test_images = _load(
        config, config.data.name, config.data.root, cache_dir, need_train=need_train)
    return RunData(dataset, train_images, dataset, test_images, cross_domain=False)
  eval_dataset, _, test_images = _load(config, eval_name, eval_root, cache_dir, need_train=False)
  dataset, train_images = eval_dataset, None
  if need_train:
    dataset, train_images, _ = _load(config, config.data.name, config.data.root, cache_dir,
                                     need_train=True)
  return RunData(dataset, train_images, eval_dataset, test_images, cross_domain=True)
