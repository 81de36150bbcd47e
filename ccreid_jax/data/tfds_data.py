"""TensorFlow Datasets (ArrayRecord) builds of the five re-ID datasets, and their reader.

Build once from a manual download (the folder layout ``load_dataset`` reads)::

  python -m ccreid_jax.data.tfds_data --dataset market1501 --manual_dir data --data_dir tfds_data

which writes ``tfds_data/ccreid_market1501/1.0.0/`` (``dataset_info.json``, ``features.json``
and ArrayRecord shards of the splits ``train`` / ``query`` / ``gallery``). Each record holds

* ``image``: the image file's bytes exactly as on disk (JPEG or PNG; not re-encoded),
* ``pid`` / ``camid`` (int32): the identity and 0-based camera ``load_dataset`` parses
  (``Record.identity`` / ``Record.camera``, stored under the names existing builds use),
* ``path`` (text): the file's path relative to the dataset folder, with ``/`` separators,
  e.g. ``bounding_box_train/0002_c1s1_000451_03.jpg``.

Parsing is ``load_dataset`` itself and the records of a split keep its order (shuffling is
disabled), so a build holds the same records as the folder loader; every image is decoded once
while building, so a build only holds images the reader can decode.

``load_tfds_dataset_images`` reads a build with ``tfds.builder_from_directory(...)
.as_data_source`` (no builder code and no TensorFlow needed) and decodes the stored bytes like
``cache.decode_image`` into the same memory-mapped uint8 cache as ``cache.load_dataset_images``.

``tensorflow_datasets`` is imported inside the functions, so importing this module does not
need it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from ccreid_jax.data import cache as cache_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data.datasets import DATASET_NAMES, DatasetError, Record, ReidDataset

__all__ = [
  "SPLITS",
  "VERSION",
  "build",
  "builder_class",
  "builder_dir",
  "load_tfds_dataset_images",
  "tfds_name",
]

logger = logging.getLogger("ccreid_jax")

VERSION = "1.0.0"

SPLITS: tuple[str, ...] = ("train", "query", "gallery")

_NAME_PREFIX = "ccreid_"  # Keeps the builders' names apart from TFDS's own catalogue.

_CACHE_VERSION = 1

_READ_CHUNK = 256  # Records deserialized per ``__getitems__`` call when reading a split.

# The stored feature names of a record's identity and camera. They stay the words of the
# builds already written (version 1.0.0): renaming them would change the on-disk format.
_IDENTITY_FEATURE = "pid"
_CAMERA_FEATURE = "camid"


class _DataSource(Protocol):
  """What is read of a TFDS data source (``builder.as_data_source()[split]``)."""

  def __len__(self) -> int: ...

  def __getitems__(self, keys: Sequence[int]) -> Sequence[dict[str, Any]]: ...


def tfds_name(name: str) -> str:
  """The TFDS name of a dataset's build, e.g. ``ccreid_market1501``.

  Raises:
    DatasetError: ``name`` is not one of ``DATASET_NAMES`` (the message lists them).
  """
  datasets_lib.dataset_folder_name(name)  # Validates the name.
  return _NAME_PREFIX + name.lower()


def builder_dir(name: str, data_dir: str) -> str:
  """Where the build of ``name`` under ``data_dir`` lives: ``<data_dir>/<tfds_name>/1.0.0``."""
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), tfds_name(name), VERSION)


def _build_command(name: str, data_dir: str) -> str:
  return (
    f"python -m ccreid_jax.data.tfds_data --dataset {name.lower()} "
    f"--manual_dir <folder holding {datasets_lib.dataset_folder_name(name)}/> "
    f"--data_dir {data_dir}"
  )


def _instructions(name: str) -> str:
  folder = datasets_lib.dataset_folder_name(name)
  return (
    f"Download and extract {folder} yourself (these builders download nothing), then "
    f"pass as manual_dir the folder that holds {folder}/ (or that folder itself): the "
    "same folder ccreid_jax's folder loader reads as config.data.root, in the same layout "
    "(ccreid_jax.data.datasets describes it; a wrong layout fails with the expected tree).\n"
    f"  {_build_command(name, 'tfds_data')}"
  )


# --------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------


def _checked_dataset(
  name: str,
  manual_dir: str,
  *,
  skip_bad_names: bool,
  skip_bad_images: bool,
  progress: bool,
  num_workers: int,
) -> ReidDataset:
  """``load_dataset`` then a decode of every image, as the folder loader would keep them.

  The images are decoded (at 1x1: the open / convert the reader runs, without keeping pixels)
  by ``cache.load_dataset_images``, which leaves out unreadable images with
  ``skip_bad_images`` exactly as training from the folders does, and raises without it.
  """
  dataset = datasets_lib.load_dataset(name, manual_dir, skip_bad_names=skip_bad_names)
  try:
    dataset, _, _ = cache_lib.load_dataset_images(
      dataset,
      1,
      1,
      None,
      need_train=True,
      skip_bad_images=skip_bad_images,
      progress=progress,
      num_workers=num_workers,
    )
  except cache_lib.ImageDecodeError as exc:
    raise cache_lib.ImageDecodeError(
      f"{exc}\nWhen building a TFDS dataset the option is --skip_bad_images "
      "(build(..., skip_bad_images=True))."
    ) from exc
  return dataset


def _relative(path: str, root: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, "/")


@functools.cache
def _builder_classes() -> dict[str, type]:
  """One registered TFDS builder class per dataset, sharing ``ReidBuilder`` (defined once)."""
  import tensorflow_datasets as tfds

  class ReidBuilder(  # type: ignore[call-arg]  # an untyped base: mypy checks object's kwargs
    tfds.core.GeneratorBasedBuilder, skip_registration=True
  ):
    """Builds a re-ID dataset from the folder in ``manual_dir`` (see the module docstring).

    Subclasses set ``name``, ``DATASET`` (one of ``DATASET_NAMES``) and
    ``MANUAL_DOWNLOAD_INSTRUCTIONS``.
    """

    # The module's VERSION string (RELEASE_NOTES' key) becomes the class's Version object.
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
      VERSION: "Records as parsed by ccreid_jax.data.datasets.load_dataset."
    }
    VERSION = tfds.core.Version(VERSION)
    DATASET = ""

    def __init__(
      self,
      *,
      skip_bad_names: bool = False,
      skip_bad_images: bool = False,
      progress: bool = True,
      num_workers: int = 4,
      **kwargs: Any,
    ):
      self._check_options: dict[str, Any] = dict(
        skip_bad_names=skip_bad_names,
        skip_bad_images=skip_bad_images,
        progress=progress,
        num_workers=num_workers,
      )
      kwargs.setdefault("file_format", "array_record")
      super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
      # No checksums file to find (the data is a manual download). TFDS's own code_path
      # needs `importlib_resources`, which TFDS does not depend on for Python >= 3.9
      # (tensorflow/datasets#11212), for builders defined in an installed package.
      return None

    def _info(self) -> Any:
      return tfds.core.DatasetInfo(
        builder=self,
        description=(
          f"{datasets_lib.dataset_folder_name(self.DATASET)} built by ccreid_jax from a "
          "manual download. image: the file's bytes as on disk (JPEG or PNG); pid, camid: "
          "the identity and 0-based camera parsed from the file name; path: relative to the "
          "dataset folder. Splits in the folder loader's order."
        ),
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            _IDENTITY_FEATURE: tfds.features.Scalar(np.int32),
            _CAMERA_FEATURE: tfds.features.Scalar(np.int32),
            "path": tfds.features.Text(),
          }
        ),
        disable_shuffling=True,  # Records keep the folder loader's order.
        metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
      dataset = _checked_dataset(
        self.DATASET, os.fspath(dl_manager.manual_dir), **self._check_options
      )
      self.info.metadata["skipped"] = list(dataset.skipped)
      return {
        split: self._generate_examples(dataset.root, getattr(dataset, split)) for split in SPLITS
      }

    def _generate_examples(self, root: str, records: Sequence[Record]) -> Any:
      for index, record in enumerate(records):
        # A path makes the Image feature store the file's bytes unchanged.
        yield (
          index,
          {
            "image": record.path,
            _IDENTITY_FEATURE: record.identity,
            _CAMERA_FEATURE: record.camera,
            "path": _relative(record.path, root).encode("utf-8", "surrogateescape"),
          },
        )

  classes = {}
  for name in DATASET_NAMES:
    class_name = "Ccreid" + name.capitalize()
    classes[name] = type(
      class_name,
      (ReidBuilder,),
      {
        "__module__": __name__,
        "__doc__": f"TFDS builder of {datasets_lib.dataset_folder_name(name)} (manual download).",
        "name": tfds_name(name),
        "DATASET": name,
        "MANUAL_DOWNLOAD_INSTRUCTIONS": _instructions(name),
      },
    )
  return classes


def builder_class(name: str) -> type:
  """The TFDS builder class of ``name`` (registered as ``tfds_name(name)``).

  Raises:
    DatasetError: unknown name.
  """
  tfds_name(name)  # Validates the name.
  return _builder_classes()[name.lower()]


def build(
  name: str,
  manual_dir: str,
  data_dir: str,
  *,
  skip_bad_names: bool = False,
  skip_bad_images: bool = False,
  overwrite: bool = False,
  progress: bool = True,
  num_workers: int = 4,
) -> str:
  """Builds the TFDS dataset of ``name`` from the folder in ``manual_dir``.

  Args:
    name: one of ``DATASET_NAMES``.
    manual_dir: the folder the folder loader would read (``config.data.root``): it holds the
      dataset folder (e.g. ``Market-1501-v15.09.15``) or is that folder.
    data_dir: where the build goes (``<data_dir>/<tfds_name(name)>/1.0.0``).
    skip_bad_names: leave out files whose names do not parse (as ``load_dataset``).
    skip_bad_images: leave out images that cannot be decoded, instead of raising.
    overwrite: build again even if a build of this version exists (otherwise it is kept).
    progress: show progress bars; ``False`` also turns TFDS's bars off for the process.
    num_workers: threads that decode the images while checking them.

  Returns:
    The build's folder, ``builder_dir(name, data_dir)``.

  Raises:
    DatasetError: unknown name, missing or malformed dataset folder (see ``load_dataset``).
    ImageDecodeError: images that cannot be decoded (without ``skip_bad_images``).
  """
  import tensorflow_datasets as tfds

  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise DatasetError(
      f"Dataset {name.lower()!r}: manual_dir {manual_dir!r} is missing or "
      f"empty.\n{_instructions(name)}"
    )
  if not progress:
    tfds.disable_progress_bar()
  builder = builder_class(name)(
    data_dir=os.path.abspath(os.path.expanduser(data_dir)),
    skip_bad_names=skip_bad_names,
    skip_bad_images=skip_bad_images,
    progress=progress,
    num_workers=num_workers,
  )
  mode = (
    tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    if overwrite
    else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
  )
  return builder_dir(name, data_dir)


# --------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------


def _find_build(name: str, data_dir: str) -> str:
  folder = builder_dir(name, data_dir)
  if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
    raise DatasetError(
      f"Dataset {name.lower()!r}: no TFDS build under data_dir {data_dir!r} "
      f"(expected {folder}/dataset_info.json). Build it with:\n"
      f"  {_build_command(name, data_dir)}"
    )
  return folder


def _split_records(source: _DataSource) -> list[Record]:
  """The ``Record`` of every example of a data source, in order (``path`` relative)."""
  records = []
  for start in range(0, len(source), _READ_CHUNK):
    for example in source.__getitems__(range(start, min(len(source), start + _READ_CHUNK))):
      path = example["path"]
      # Stored as the file system's bytes: a name that is not UTF-8 comes back as it was read.
      path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else str(path)
      records.append(Record(path, int(example[_IDENTITY_FEATURE]), int(example[_CAMERA_FEATURE])))
  return records


def _tfds_cache_file_name(
  folder: str, splits: Sequence[str], count: int, height: int, width: int
) -> str:
  """A cache file name that changes with anything in the build's folder, the splits or size.

  Hashes the folder's path, the content of its ``dataset_info.json`` and the name, size and
  modification time (nanoseconds) of every file in it.
  """
  files = []
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    st = entry.stat()
    files.append([entry.name, st.st_size, st.st_mtime_ns])
  with open(os.path.join(folder, "dataset_info.json"), "rb") as f:
    info_digest = hashlib.sha256(f.read()).hexdigest()
  payload = json.dumps(
    {
      "version": _CACHE_VERSION,
      "folder": folder,
      "info": info_digest,
      "files": files,
      "splits": list(splits),
      "height": height,
      "width": width,
    },
    separators=(",", ":"),
  )
  digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]
  name = os.path.basename(os.path.dirname(folder))
  return f"tfds_{name}_{'+'.join(splits)}_{count}x{height}x{width}_{digest}.npy"


# config.data.skip_bad_images filters image folders; a TFDS build's images are filtered when
# it is built.
_TFDS_SKIP_HINT = (
  "rebuild the TFDS dataset without them (python -m ccreid_jax.data.tfds_data "
  "... --skip_bad_images); --config.data.skip_bad_images applies to image "
  "folders, not to a TFDS build"
)


def load_tfds_dataset_images(
  name: str,
  data_dir: str,
  height: int,
  width: int,
  cache_dir: str | None,
  *,
  need_train: bool = True,
  progress: bool = True,
  num_workers: int = 4,
) -> tuple[ReidDataset, np.ndarray | None, np.ndarray]:
  """A TFDS build's records and decoded images: ``(dataset, train_images, test_images)``.

  The contract of ``cache.load_dataset_images``: ``test_images`` holds the query images then
  the gallery images, ``train_images`` is None unless ``need_train``, images are uint8
  (N, height, width, 3) decoded like ``cache.decode_image`` (PIL, RGB, BICUBIC) from the stored
  file bytes, so they equal the folder loader's pixel for pixel. With ``cache_dir`` they are
  cached as a memory-mapped ``.npy`` written atomically, named by a hash that changes when the
  build changes; later calls decode nothing.

  The returned dataset's ``root`` is the build's folder (``builder_dir(name, data_dir)``), each
  ``Record.path`` is the path relative to the original dataset folder as stored (no file of
  that name needs to exist), and ``skipped`` lists the files the build left out.

  Reads with ``tfds.builder_from_directory(...).as_data_source``: neither the builder classes
  nor TensorFlow are needed.

  Raises:
    DatasetError: unknown name, or no build of ``name`` under ``data_dir`` (the message gives
      the command that builds it).
  """
  folder = _find_build(name, data_dir)
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(folder)
  sources = {
    split: builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    for split in SPLITS
  }
  records = {split: _split_records(sources[split]) for split in SPLITS}
  skipped = tuple(builder.info.metadata.get("skipped", ())) if builder.info.metadata else ()
  dataset = ReidDataset(
    name=name.lower(),
    root=folder,
    train=records["train"],
    query=records["query"],
    gallery=records["gallery"],
    skipped=skipped,
  )

  def load(splits: Sequence[str]) -> np.ndarray:
    rows = [(split, i) for split in splits for i in range(len(records[split]))]
    labels = [f"{records[split][i].path} ({tfds_name(name)}/{split}[{i}])" for split, i in rows]

    def read(k: int) -> bytes:
      split, i = rows[k]
      return sources[split][i]["image"]

    file_name = (
      _tfds_cache_file_name(folder, splits, len(rows), height, width)
      if cache_dir is not None
      else None
    )
    return cache_lib.load_image_cache(
      labels,
      height,
      width,
      cache_dir,
      progress=progress,
      num_workers=num_workers,
      read=read,
      file_name=file_name,
      skip_hint=_TFDS_SKIP_HINT,
    )

  train_images = load(("train",)) if need_train else None
  return dataset, train_images, load(("query", "gallery"))


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m ccreid_jax.data.tfds_data --dataset NAME --manual_dir DIR --data_dir DIR``."""
  parser = argparse.ArgumentParser(
    description="Build the TFDS (ArrayRecord) dataset of a re-ID dataset from its folder."
  )
  parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
  parser.add_argument(
    "--manual_dir",
    required=True,
    help="folder holding the dataset folder (the folder loader's data.root)",
  )
  parser.add_argument("--data_dir", required=True, help="where the TFDS build is written")
  parser.add_argument(
    "--skip_bad_names",
    action="store_true",
    help="leave out files whose names do not parse, instead of failing",
  )
  parser.add_argument(
    "--skip_bad_images",
    action="store_true",
    help="leave out images that cannot be decoded, instead of failing",
  )
  parser.add_argument(
    "--overwrite", action="store_true", help="build again even if this version is already built"
  )
  parser.add_argument(
    "--num_workers", type=int, default=4, help="threads that decode the images to check them"
  )
  args = parser.parse_args(argv)
  try:
    folder = build(
      args.dataset,
      args.manual_dir,
      args.data_dir,
      skip_bad_names=args.skip_bad_names,
      skip_bad_images=args.skip_bad_images,
      overwrite=args.overwrite,
      num_workers=args.num_workers,
    )
  except (DatasetError, cache_lib.ImageDecodeError) as exc:
    parser.exit(1, f"error: {exc}\n")
  with open(os.path.join(folder, "dataset_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  counts = {s["name"]: sum(int(n) for n in s.get("shardLengths", ())) for s in info["splits"]}
  print(
    f"TFDS dataset {tfds_name(args.dataset)} {VERSION} ready in {folder}\n"
    f"  images: train {counts.get('train', 0)}, query {counts.get('query', 0)}, "
    f"gallery {counts.get('gallery', 0)}\n"
    f"  train from it with --config.data.source=tfds "
    f"--config.data.root={os.path.abspath(os.path.expanduser(args.data_dir))}"
  )


if __name__ == "__main__":
  main()
