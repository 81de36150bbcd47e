"""Features of a split written to ``.npz`` for analysis outside the training code.

``extract_split(run, variables, split)`` computes the L2-normalised features of the train,
query or gallery images of a ``train._Run``; ``export_features`` writes them with the ids,
cameras and image paths of their records; ``load_exported`` reads such a file back without
pickle (paths are stored as a unicode array)::

    exported = load_exported("query.npz")
    exported.features  # (N, D) float32
    exported.ids, exported.cams  # (N,) int64
    exported.paths  # (N,) str
    exported.split  # "query"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


__all__ = ["SPLITS", "ExportedFeatures", "export_features", "extract_split", "load_exported",
           "split_images"]

SPLITS = ("train", "query", "gallery")


@dataclasses.dataclass(frozen=True)
class ExportedFeatures:
  """The contents of an exported ``.npz``: one row per image."""

  features: np.ndarray  # (N, D) float32.
  ids: np.ndarray  # (N,) int64 identities (-1 never occurs: junk images are not loaded).
  cams: np.ndarray  # (N,) int64 0-based camera ids.
  paths: np.ndarray  # (N,) unicode image paths.
  split: str  # "train", "query" or "gallery".


def export_features(path: str, features: np.ndarray, records: Sequence[Any], split: str) -> None:
  """Writes ``features`` and the ``records``' ids, cameras and paths to ``path`` (.npz).

  ``records`` are dataset records (anything with ``path``, ``pid`` and ``camid``), one per
  feature row. The file is written under a temporary name and renamed, so a reader never sees
  half of it; ``path`` is used as given (no ``.npz`` is appended).
  """
  features = np.asarray(features, dtype=np.float32)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}.")
  if len(records) != features.shape[0]:
    raise ValueError(f"{features.shape[0]} feature rows but {len(records)} records.")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  arrays = {
      "features": features,
      "ids": np.array([int(r.pid) for r in records], dtype=np.int64),
      "cams": np.array([int(r.camid) for r in records], dtype=np.int64),
      "paths": np.array([str(r.path) for r in records], dtype=np.str_),
      "split": np.array(split, dtype=np.str_),
  }
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_exported(path: str) -> ExportedFeatures:
  """Reads a file written by ``export_features``."""
  with np.load(path, allow_pickle=False) as data:
    missing = {"features", "ids", "cams", "paths", "split"} - set(data.files)
    if missing:
      raise ValueError(f"{path} is not an exported feature file: missing {sorted(missing)}.")
    return ExportedFeatures(
        features=data["features"], ids=data["ids"], cams=data["cams"], paths=data["paths"],
        split=str(data["split"]))


def split_images(run: Any, split: str) -> tuple[np.ndarray, list[Any]]:
  """``(uint8 images, records)`` of a split of a ``train._Run``, rows aligned with records.

  ``run.test_images`` holds the query images followed by the gallery images of
  ``run.eval_dataset`` (``run.dataset`` when the run has no separate evaluation dataset).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if split == "train":
    if run.train_images is None:
      raise ValueError("this run loaded no train images: build it with need_train=True to "
                       "extract the train split.")
    return run.train_images, list(run.dataset.train)
  test = getattr(run, "eval_dataset", None) or run.dataset
  num_query = len(test.query)
  if split == "query":
    return run.test_images[:num_query], list(test.query)
  return run.test_images[num_query:], list(test.gallery)


def extract_split(run: Any, variables: Any, split: str) -> tuple[np.ndarray, list[Any]]:
  """``(features (N, D) float32, records)`` of ``split`` ("train", "query" or "gallery").

  Uses ``run.extract`` of a ``train._Run``, as the evaluation does.
  """
  images, records = split_images(run, split)
  if images.shape[0] != len(records):
    raise ValueError(f"the {split} split has {len(records)} records but {images.shape[0]} "
                     "images.")
  features = run.extract(variables, images, desc=f"{split} extract")
  return features, records
