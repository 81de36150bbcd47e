"""Feature files: the features of a split in an ``.npz``, for analysis outside the training code.

``extract_split(data, extract, variables, split)`` computes the L2-normalised features of the
train, query or gallery images of a ``data.loading.RunData`` with a feature extractor
(``extract.FeatureExtractor``); ``write_features`` writes them with the identities,
cameras and image paths of their records; ``read_features`` reads such a file back without
pickle (paths are stored as a unicode array)::

    loaded = read_features("query.npz")
    loaded.features  # (N, D) float32
    loaded.identities, loaded.cameras  # (N,) int64
    loaded.paths  # (N,) str
    loaded.split  # "query"
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ccreid_jax.data import loading
from ccreid_jax.data.datasets import Record
from ccreid_jax.utils import write_atomic

__all__ = [
  "SPLITS",
  "FeatureFile",
  "OutputPathError",
  "check_output_path",
  "extract_split",
  "read_features",
  "split_images",
  "write_features",
]

SPLITS = ("train", "query", "gallery")

_KEYS = ("features", "identities", "cameras", "paths", "split")  # The arrays of a feature file.
# Keys of files written before the rename, read as today's so that those files still load.
_OLD_KEYS = {"ids": "identities", "cams": "cameras"}


class OutputPathError(ValueError):
  """A path features cannot be written to: a folder, under a file, or not writable."""


def check_output_path(path: str) -> None:
  """Checks that a file can be written at ``path``, creating its missing parent folders.

  Meant to run before the features are computed, so a typo costs nothing.

  Raises:
    OutputPathError: naming ``path`` as given, when it is a folder, when a file stands where a
      parent folder should be, or when its folder cannot be written to.
  """
  if os.path.isdir(path):
    raise OutputPathError(
      f"--out {path} is a folder; give the name of the file to write, e.g. "
      f"{os.path.join(path, 'query.npz')}."
    )
  folder = os.path.dirname(os.path.abspath(path))
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise OutputPathError(f"--out {path} cannot be written: {existing} is a file, not a folder.")
  try:
    os.makedirs(folder, exist_ok=True)
    probe, probe_path = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    os.close(probe)
    os.remove(probe_path)
  except OSError as exc:
    raise OutputPathError(
      f"--out {path} cannot be written: {exc.strerror or exc} ({folder})."
    ) from None


@dataclasses.dataclass(frozen=True)
class FeatureFile:
  """The contents of an feature file (``.npz``): one row per image."""

  features: np.ndarray  # (N, D) float32.
  identities: np.ndarray  # (N,) int64 (-1 never occurs: junk images are not loaded).
  cameras: np.ndarray  # (N,) int64 0-based cameras.
  paths: np.ndarray  # (N,) unicode image paths.
  split: str  # "train", "query" or "gallery".


def write_features(path: str, features: np.ndarray, records: Sequence[Record], split: str) -> None:
  """Writes ``features`` and the ``records``' identities, cameras and paths to ``path`` (.npz).

  ``records`` are dataset records (anything with ``path``, ``identity`` and ``camera``), one per
  feature row. The file is written under a temporary name and renamed, so a reader never sees
  half of it, and the temporary file is removed when writing or renaming fails; ``path`` is
  used as given (no ``.npz`` is appended).

  Raises:
    OutputPathError: ``path`` cannot be written (see ``check_output_path``).
  """
  features = np.asarray(features, dtype=np.float32)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}.")
  if len(records) != features.shape[0]:
    raise ValueError(f"{features.shape[0]} feature rows but {len(records)} records.")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  check_output_path(path)
  arrays = {
    "features": features,
    "identities": np.array([int(r.identity) for r in records], dtype=np.int64),
    "cameras": np.array([int(r.camera) for r in records], dtype=np.int64),
    "paths": np.array([str(r.path) for r in records], dtype=np.str_),
    "split": np.array(split, dtype=np.str_),
  }
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # type: ignore[arg-type]  # stub: **arrays could fill allow_pickle
  write_atomic(path, buffer.getvalue())


def read_features(path: str) -> FeatureFile:
  """Reads a file written by ``write_features``, also one with the old keys ``ids`` / ``cams``."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {_OLD_KEYS.get(name, name): data[name] for name in data.files}
    missing = set(_KEYS) - set(arrays)
    if missing:
      raise ValueError(
        f"{path} is not a feature file (written by write_features): missing {sorted(missing)}."
      )
    return FeatureFile(
      features=arrays["features"],
      identities=arrays["identities"],
      cameras=arrays["cameras"],
      paths=arrays["paths"],
      split=str(arrays["split"]),
    )


def split_images(run: loading.RunData, split: str) -> tuple[np.ndarray, list[Record]]:
  """``(uint8 images, records)`` of a split of a ``data.loading.RunData``, rows aligned with
  records.

  ``run.test_images`` holds the query images followed by the gallery images of
  ``run.eval_dataset`` (``run.dataset`` when the run has no separate evaluation dataset).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if split == "train":
    if run.train_images is None:
      raise ValueError(
        "this run loaded no train images: build it with need_train=True to extract the train split."
      )
    return run.train_images, list(run.dataset.train)
  test = getattr(run, "eval_dataset", None) or run.dataset
  if run.test_images is None:
    raise ValueError(f"this run loaded no query / gallery images to extract the {split} split.")
  num_query = len(test.query)
  if split == "query":
    return run.test_images[:num_query], list(test.query)
  return run.test_images[num_query:], list(test.gallery)


def extract_split(
  data: loading.RunData, extract: Callable[..., np.ndarray], variables: Any, split: str
) -> tuple[np.ndarray, list[Record]]:
  """``(features (N, D) float32, records)`` of ``split`` ("train", "query" or "gallery").

  ``data``: a ``data.loading.RunData``; ``extract``: ``extract(variables, images, desc=...)``
  as ``extract.FeatureExtractor`` builds it for the evaluation.
  """
  images, records = split_images(data, split)
  if images.shape[0] != len(records):
    raise ValueError(f"the {split} split has {len(records)} records but {images.shape[0]} images.")
  features = extract(variables, images, desc=f"{split} extract")
  return features, records
