"""Parsers for the re-identification datasets (docs/algorithms.md section 3).

Every parser reads identities and cameras from the *file name* (never from parent folders), keeps
only ``.jpg`` / ``.jpeg`` / ``.png`` files, sorts them by path for determinism and returns 0-based
cameras. Person / vehicle identities are kept exactly as written in the file name (no
relabelling): unsupervised training never reads the train identities, and evaluation compares
identities for equality only.

Supported datasets (``DATASET_NAMES``): Market-1501, DukeMTMC-reID, MSMT17 (Market-style converted
layout or the official ``list_*.txt`` layout), VeRi-776 and PersonX.

``load_folder_dataset`` reads a user's own images instead (``data.name = "folder"``): any tree of
image files with any names, without identities (every train ``identity`` is
``UNKNOWN_IDENTITY``), cameras from a sub-folder level, a file-name regular expression or none at
all, and an optional labelled query / gallery list file (``read_eval_list``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = [
  "CAMERA_SOURCES",
  "DATASET_NAMES",
  "FOLDER_IMAGE_EXTENSIONS",
  "FOLDER_NAME",
  "UNKNOWN_IDENTITY",
  "DatasetError",
  "Record",
  "ReidDataset",
  "check_folder_size",
  "dataset_folder_name",
  "folder_min_images",
  "load_dataset",
  "load_folder_dataset",
  "read_eval_list",
]

DATASET_NAMES: tuple[str, ...] = ("market1501", "dukemtmcreid", "msmt17", "veri776", "personx")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

MAX_LISTED = 10  # Bad file names listed in an error message; the rest are counted.

FOLDER_NAME = "folder"  # ``data.name`` of a user's own folder of images (``load_folder_dataset``).
CAMERA_SOURCES: tuple[str, ...] = ("none", "folder", "regex")  # ``data.cameras`` values.
# The extensions ``load_folder_dataset`` reads (any case); other files are counted and ignored.
FOLDER_IMAGE_EXTENSIONS: tuple[str, ...] = (
  ".jpg",
  ".jpeg",
  ".png",
  ".bmp",
  ".ppm",
  ".pgm",
  ".tif",
  ".tiff",
  ".webp",
)
# ``Record.identity`` of an image whose identity is not known (a folder's train images).
UNKNOWN_IDENTITY = -1

logger = logging.getLogger("ccreid_jax")


class DatasetError(FileNotFoundError, ValueError):
  """A dataset cannot be loaded: unknown name, missing folder, empty split or malformed file.

  Subclasses both ``FileNotFoundError`` (missing folders / files) and ``ValueError`` (bad names,
  out-of-range cameras), so either ``except`` clause catches it.
  """


class Record(NamedTuple):
  """One image of a split: its path, identity and 0-based camera."""

  path: str
  identity: int
  camera: int


@dataclasses.dataclass(frozen=True)
class ReidDataset:
  """The three splits of a re-ID dataset.

  Attributes:
    name: one of ``DATASET_NAMES``.
    root: the dataset folder that was read (e.g. ``.../Market-1501-v15.09.15``).
    train: training images (junk and distractors removed).
    query: query images.
    gallery: gallery images (for Market-1501 including the distractors, identity 0).
    skipped: files left out because their names do not parse (``skip_bad_names=True``),
      one message naming the file and the reason each.
    camera_names: the name of each train camera (camera ``i`` is ``camera_names[i]``) when the
      cameras were read from folder or file names (``load_folder_dataset``); empty for the
      benchmarks, whose cameras are their file names' camera numbers, shifted to start at 0.
    has_cameras: False when no camera was given (``data.cameras = "none"``): every camera is 0
      and means nothing.
  """

  name: str
  root: str
  train: list[Record]
  query: list[Record]
  gallery: list[Record]
  skipped: tuple[str, ...] = ()
  camera_names: tuple[str, ...] = ()
  has_cameras: bool = True

  @property
  def has_eval(self) -> bool:
    """Whether there is a query / gallery to evaluate (a folder dataset may have none)."""
    return bool(self.query) and bool(self.gallery)

  @property
  def has_train_identities(self) -> bool:
    """Whether the train identities are known (not ``UNKNOWN_IDENTITY``), e.g. for diagnostics."""
    return any(r.identity != UNKNOWN_IDENTITY for r in self.train)

  @property
  def num_train_identities(self) -> int:
    """Number of distinct identities in the training split."""
    return len({r.identity for r in self.train})

  @property
  def num_train_cameras(self) -> int:
    """Number of distinct cameras in the training split."""
    return len({r.camera for r in self.train})

  @property
  def num_train_images(self) -> int:
    """Number of training images."""
    return len(self.train)

  def summary(self) -> str:
    """A small human-readable table with identities / images / cameras per split."""
    lines = [f"{self.name} ({self.root})", "  split   | identities | images | cameras"]
    for split_name, records in (
      ("train", self.train),
      ("query", self.query),
      ("gallery", self.gallery),
    ):
      train = split_name == "train"
      identities = (
        "-" if train and not self.has_train_identities else len({r.identity for r in records})
      )
      cameras = "-" if train and not self.has_cameras else len({r.camera for r in records})
      lines.append(f"  {split_name:<7} | {identities:>10} | {len(records):>6} | {cameras:>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Per-dataset descriptions.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one dataset is laid out and how its file names are parsed."""

  name: str
  folder: str
  split_dirs: tuple[str, str, str]  # train, query, gallery
  pattern: re.Pattern[str]
  camera_to_index: Callable[[int], int | None]  # raw camera -> 0-based camera, None if invalid
  camera_description: str
  example: str
  market_filters: bool  # identity 0 is a distractor (gallery only)


def _range_cameras(low: int, high: int) -> Callable[[int], int | None]:
  """Cameras numbered ``low..high`` map to ``0..high-low``."""

  def to_index(camera: int) -> int | None:
    return camera - low if low <= camera <= high else None

  return to_index


_PERSONX_CAMERAS: dict[int, int] = {3: 0, 4: 1, 8: 2, 10: 3, 11: 4, 12: 5}

_MARKET_SPLITS = ("bounding_box_train", "query", "bounding_box_test")

_SPECS: dict[str, _Spec] = {
  "market1501": _Spec(
    name="market1501",
    folder="Market-1501-v15.09.15",
    split_dirs=_MARKET_SPLITS,
    pattern=re.compile(r"([-\d]+)_c(\d)"),
    camera_to_index=_range_cameras(1, 6),
    camera_description="1..6",
    example="0002_c1s1_000451_03.jpg",
    market_filters=True,
  ),
  "dukemtmcreid": _Spec(
    name="dukemtmcreid",
    folder="DukeMTMC-reID",
    split_dirs=_MARKET_SPLITS,
    pattern=re.compile(r"([-\d]+)_c(\d)"),
    camera_to_index=_range_cameras(1, 8),
    camera_description="1..8",
    example="0001_c2_f0046182.jpg",
    market_filters=False,
  ),
  "msmt17": _Spec(
    name="msmt17",
    folder="MSMT17_V1",
    split_dirs=_MARKET_SPLITS,
    pattern=re.compile(r"([-\d]+)_c(\d+)"),
    camera_to_index=_range_cameras(1, 15),
    camera_description="1..15",
    example="0000_c1_0000.jpg",
    market_filters=False,
  ),
  "veri776": _Spec(
    name="veri776",
    folder="VeRi",
    split_dirs=("image_train", "image_query", "image_test"),
    pattern=re.compile(r"([\d]+)_c(\d+)"),
    camera_to_index=_range_cameras(1, 20),
    camera_description="1..20",
    example="0001_c001_00016450_0.jpg",
    market_filters=False,
  ),
  "personx": _Spec(
    name="personx",
    folder="PersonX",
    split_dirs=_MARKET_SPLITS,
    pattern=re.compile(r"([-\d]+)_c([-\d]+)"),
    camera_to_index=_PERSONX_CAMERAS.get,
    camera_description="one of 3, 4, 8, 10, 11, 12",
    example="0001_c3_0001.jpg",
    market_filters=False,
  ),
}

_MSMT_LIST_FILES = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def dataset_folder_name(name: str) -> str:
  """The folder name a dataset is distributed in, e.g. ``Market-1501-v15.09.15``."""
  return _get_spec(name).folder


def _get_spec(name: str) -> _Spec:
  key = name.lower()
  if key not in _SPECS:
    raise DatasetError(
      f"Unknown dataset name {name!r}; expected one of: {', '.join(DATASET_NAMES)}."
    )
  return _SPECS[key]


def _expected_tree(spec: _Spec) -> str:
  """An indented picture of the folder layout a dataset is expected to have."""
  train, query, gallery = spec.split_dirs
  lines = [
    f"  {spec.folder}/",
    f"    {train}/  {spec.example} ...",
    f"    {query}/",
    f"    {gallery}/",
  ]
  if spec.name == "msmt17":
    lines += [
      "  or the official MSMT17 layout:",
      f"  {spec.folder}/",
      "    train/  0000/0000_000_01_0303morning_0015_0.jpg ...",
      "    test/",
      "    list_train.txt  list_val.txt  list_query.txt  list_gallery.txt",
      "      (each line: 'relative/path.jpg identity', e.g. "
      "'0000/0000_000_01_0303morning_0015_0.jpg 0')",
    ]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Locating the dataset folder.
# --------------------------------------------------------------------------------------------


def _is_market_style(folder: str, spec: _Spec) -> bool:
  return os.path.isdir(os.path.join(folder, spec.split_dirs[0]))


def _is_msmt_official(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "list_train.txt"))


def _resolve_folder(spec: _Spec, root: str) -> tuple[str, bool]:
  """Find the dataset folder under ``root``.

  Returns:
    ``(folder, official_msmt)``: the dataset folder and whether it uses the official MSMT17
    list layout.
  """
  root = os.path.abspath(os.path.expanduser(root))
  candidates = [
    os.path.join(root, spec.folder),
    root,
    os.path.join(root, spec.name, spec.folder),
  ]
  for folder in candidates:
    if _is_market_style(folder, spec):
      return folder, False
    if spec.name == "msmt17" and _is_msmt_official(folder):
      return folder, True
  tried = "\n".join(f"  {c}" for c in candidates)
  raise DatasetError(
    f"Dataset {spec.name!r}: no dataset folder found under root {root!r}.\n"
    f"Paths tried (the first should exist):\n{tried}\n"
    f"Expected tree (root may be the parent folder or the dataset folder itself):\n"
    f"{_expected_tree(spec)}"
  )


# --------------------------------------------------------------------------------------------
# Parsing.
# --------------------------------------------------------------------------------------------


def _list_images(directory: str, spec: _Spec) -> list[str]:
  """Sorted image file names in ``directory``; raises if the folder is missing.

  Symbolic links named like images are kept even when they lead nowhere (dangling, or a
  loop): reading them fails later and they are reported with the unreadable images.
  """
  if not os.path.isdir(directory):
    raise DatasetError(
      f"Dataset {spec.name!r}: split folder {directory!r} is missing.\n"
      f"Expected tree:\n{_expected_tree(spec)}"
    )
  return sorted(
    f
    for f in os.listdir(directory)
    if f.lower().endswith(IMAGE_EXTENSIONS)
    and (os.path.isfile(os.path.join(directory, f)) or os.path.islink(os.path.join(directory, f)))
  )


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def _listed(lines: Sequence[str]) -> str:
  """The first ``MAX_LISTED`` lines, indented, and how many more there are."""
  listed = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
  more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
  return listed + more


class _Containment:
  """Collects image paths that lead outside the dataset folder.

  A path written outside the folder (``../``, an absolute path elsewhere) is refused unless
  ``allow_outside_paths``; a path inside it that resolves outside through a symbolic link (the
  image, or a folder on the way) only without ``allow_outside_links``. The dataset folder
  itself may be a link.
  """

  def __init__(self, folder: str, allow_outside_links: bool, *, allow_outside_paths: bool = False):
    self.folder = os.path.normpath(folder)
    self.real_folder = os.path.realpath(folder)
    self.allow_outside_links = allow_outside_links
    self.allow_outside_paths = allow_outside_paths
    self.written_outside: list[str] = []
    self.linked_outside: list[str] = []
    self._real_dirs: dict[str, str] = {}

  def _resolve(self, path: str) -> str:
    directory = os.path.dirname(path)
    if directory not in self._real_dirs:
      self._real_dirs[directory] = os.path.realpath(directory)
    real = os.path.join(self._real_dirs[directory], os.path.basename(path))
    return os.path.realpath(real) if os.path.islink(real) else real

  def keep(self, path: str, where: str = "", written: str = "") -> bool:
    """Whether ``path`` may be read; records why not. ``where``: e.g. "<list> line 3",
    ``written``: the path as the list file gives it."""
    prefix = f"{where}: " if where else ""
    if not _inside(os.path.normpath(path), self.folder):
      if self.allow_outside_paths:
        return True
      given = f"{written!r} resolves to " if written else ""
      self.written_outside.append(f"{prefix}{given}{os.path.normpath(path)}")
      return False
    if self.allow_outside_links:
      return True
    real = self._resolve(path)
    if not _inside(real, self.real_folder):
      self.linked_outside.append(f"{prefix}{path} is a link to {real}")
      return False
    return True

  def error(self, subject: str, written_fix: str) -> DatasetError | None:
    """One error listing every refused path, or None.

    Args:
      subject: what was read, e.g. "Dataset 'msmt17'".
      written_fix: how list entries name images inside the folder (the fix for paths
        written outside it).
    """
    lines = self.written_outside + self.linked_outside
    if not lines:
      return None
    ways = []
    if self.written_outside:
      ways.append(written_fix)
    if self.linked_outside:
      ways.append(
        "move the linked images into the folder, or allow links that lead "
        "outside it with --config.data.follow_symlinks_outside=True"
      )
    way_out = "; ".join(ways)
    return DatasetError(
      f"{subject}: {len(lines)} image path(s) lead outside the folder "
      f"{self.folder}:\n{_listed(lines)}\n{way_out[0].upper()}{way_out[1:]}."
    )


def _camera_index(spec: _Spec, camera: int, path: str) -> int:
  index = spec.camera_to_index(camera)
  if index is None:
    raise DatasetError(
      f"camera {camera} parsed from file {path!r} is out of range "
      f"(expected {spec.camera_description})"
    )
  return index


def _parse_name(spec: _Spec, path: str) -> tuple[int, int]:
  """``(identity, raw camera)`` from a file name with the dataset's regular expression."""
  match = spec.pattern.search(os.path.basename(path))
  try:
    if match is None:
      raise ValueError
    return int(match.group(1)), int(match.group(2))
  except ValueError:  # no match, or a match such as "-" that is not a number.
    raise DatasetError(
      f"cannot parse identity and camera from file {path!r} (expected a name like {spec.example!r})"
    ) from None


def _keep(spec: _Spec, identity: int, split: str) -> bool:
  """Whether a record of ``identity`` belongs in ``split`` after junk / distractor filtering."""
  if identity == -1:  # junk images: dropped everywhere.
    return False
  if spec.market_filters and identity == 0:  # Market distractors: gallery only.
    return split == "gallery"
  return True


def _check_nonempty(spec: _Spec, records: Sequence[Record], split: str, where: str) -> None:
  if not records:
    raise DatasetError(
      f"Dataset {spec.name!r}: the {split} split read from {where!r} is empty "
      f"(no usable .jpg/.jpeg/.png images).\nExpected tree:\n{_expected_tree(spec)}"
    )


# Each parser returns ``{split: (records, where)}`` (``where``: the folder or list file the
# split was read from, for the empty-split message) and appends one ``"<reason>"`` line per
# file whose name does not parse to ``bad``.
_Splits = dict[str, tuple[list[Record], str]]


def _parse_market_style(spec: _Spec, folder: str, bad: list[str], contain: _Containment) -> _Splits:
  splits: _Splits = {}
  for split, sub in zip(("train", "query", "gallery"), spec.split_dirs):
    directory = os.path.join(folder, sub)
    records = []
    for fname in _list_images(directory, spec):
      path = os.path.join(directory, fname)
      if not contain.keep(path):
        continue
      try:
        identity, camera = _parse_name(spec, path)
        if not _keep(spec, identity, split):
          continue
        records.append(Record(path, identity, _camera_index(spec, camera, path)))
      except DatasetError as exc:
        bad.append(str(exc))
    splits[split] = (records, directory)
  return splits


def _msmt_official_camera(spec: _Spec, path: str) -> int:
  """Camera of an official MSMT17 file name: the third ``_``-separated field."""
  fields = os.path.basename(path).split("_")
  if len(fields) < 3 or not fields[2].isdigit():
    raise DatasetError(
      f"cannot parse the camera (third '_' field) from file {path!r} "
      "(expected a name like '0000_000_01_0303morning_0015_0.jpg')"
    )
  return _camera_index(spec, int(fields[2]), path)


def _read_msmt_list(
  spec: _Spec, list_path: str, image_dir: str, bad: list[str], contain: _Containment
) -> list[Record]:
  if not os.path.isfile(list_path):
    raise DatasetError(
      f"Dataset {spec.name!r}: list file {list_path!r} is missing.\n"
      f"Expected tree:\n{_expected_tree(spec)}"
    )
  records = []
  with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DatasetError(
          f"Dataset {spec.name!r}: line {line_no} of {list_path!r} is malformed: "
          f"{line!r} (expected 'relative/path.jpg identity')."
        )
      rel, identity_text = parts
      if not rel.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(image_dir, rel)
      if not contain.keep(path, f"{list_path} line {line_no}", rel):
        continue
      try:
        records.append(Record(path, int(identity_text), _msmt_official_camera(spec, path)))
      except DatasetError as exc:
        bad.append(str(exc))
  return records


def _parse_msmt_official(
  spec: _Spec, folder: str, bad: list[str], contain: _Containment
) -> _Splits:
  for sub in ("train", "test"):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise DatasetError(
        f"Dataset {spec.name!r}: image folder {os.path.join(folder, sub)!r} is missing.\n"
        f"Expected tree:\n{_expected_tree(spec)}"
      )
  train_dir, test_dir = os.path.join(folder, "train"), os.path.join(folder, "test")
  sources = {
    "train": [("list_train.txt", train_dir), ("list_val.txt", train_dir)],
    "query": [("list_query.txt", test_dir)],
    "gallery": [("list_gallery.txt", test_dir)],
  }
  splits: _Splits = {}
  for split, lists in sources.items():
    records: list[Record] = []
    for list_name, image_dir in lists:
      records += _read_msmt_list(spec, os.path.join(folder, list_name), image_dir, bad, contain)
    records = sorted(r for r in records if _keep(spec, r.identity, split))
    splits[split] = (records, os.path.join(folder, lists[0][0]))
  return splits


def _bad_names_error(spec: _Spec, bad: Sequence[str]) -> DatasetError:
  return DatasetError(
    f"Dataset {spec.name!r}: {len(bad)} file name(s) do not give an identity and a camera "
    f"(pattern {spec.pattern.pattern} on the file name, e.g. {spec.example!r}, cameras "
    f"{spec.camera_description}):\n{_listed(bad)}\n"
    "Rename or remove these files, or skip them with --config.data.skip_bad_names=True."
  )


def load_dataset(
  name: str, root: str, *, skip_bad_names: bool = False, allow_outside_links: bool = False
) -> ReidDataset:
  """Read the train / query / gallery splits of a dataset.

  Args:
    name: one of ``DATASET_NAMES`` (case-insensitive).
    root: the folder that contains the dataset folder (e.g. the parent of
      ``Market-1501-v15.09.15``) or the dataset folder itself.
    skip_bad_names: leave out (with a logged warning, and listed in ``skipped``) the image
      files whose names do not parse or name a camera out of range, instead of raising.
    allow_outside_links: read images that are (or lie in folders that are) symbolic links
      leading outside the dataset folder. The dataset folder itself may always be a link;
      list entries (official MSMT17) written outside the folder are refused regardless.

  Returns:
    A ``ReidDataset`` whose records are sorted by path, with 0-based cameras and the
    identities as written.

  Raises:
    DatasetError: unknown name, missing folder, empty split, image paths leading outside the
      dataset folder (naming the list file and line), or (without ``skip_bad_names``)
      file names that do not parse or a camera outside the dataset's range; every such file
      is collected and the first ``MAX_LISTED`` are listed in one error.
  """
  spec = _get_spec(name)
  folder, official_msmt = _resolve_folder(spec, root)
  bad: list[str] = []
  contain = _Containment(folder, allow_outside_links)
  if official_msmt:
    splits = _parse_msmt_official(spec, folder, bad, contain)
  else:
    splits = _parse_market_style(spec, folder, bad, contain)
  outside = contain.error(
    f"Dataset {spec.name!r}",
    "list entries must name images inside the dataset folder "
    "(paths relative to its train/ or test/ folder)",
  )
  if outside is not None:
    raise outside
  if bad and not skip_bad_names:
    raise _bad_names_error(spec, bad)
  if bad:
    logger.warning(
      "dataset %s: skipped %d file(s) whose names do not parse (first: %s)",
      spec.name,
      len(bad),
      bad[0],
    )
  for split, (records, where) in splits.items():
    _check_nonempty(spec, records, split, where)
  return ReidDataset(
    name=spec.name,
    root=folder,
    train=splits["train"][0],
    query=splits["query"][0],
    gallery=splits["gallery"][0],
    skipped=tuple(bad),
  )


# --------------------------------------------------------------------------------------------
# A folder of the user's own images (data.name = "folder").
# --------------------------------------------------------------------------------------------


def folder_min_images(num_instances: int, min_samples: int) -> int:
  """The fewest train images a folder dataset may have: ``2 * max(K, min_samples)``.

  Fewer images cannot hold two pseudo identities of ``train.num_instances`` (K) distinct images
  each, nor two DBSCAN clusters of ``cluster.min_samples`` members: the contrastive loss then
  has at most one class to contrast with, and training learns nothing.
  """
  return 2 * max(int(num_instances), int(min_samples), 1)


def _natural_key(name: str) -> list:
  """Sort key that compares the digit runs of a name by value: "c2" < "c10"."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _camera_indices(names: Sequence[str]) -> tuple[list[int], tuple[str, ...]]:
  """``(0-based camera of each name, the names in camera order)``: sorted, numbers by value."""
  ordered = tuple(sorted(set(names), key=_natural_key))
  index = {name: i for i, name in enumerate(ordered)}
  return [index[name] for name in names], ordered


def _describe_cameras(names: Sequence[str], limit: int = 20) -> str:
  shown = ", ".join(f"{name!r} -> {i}" for i, name in enumerate(names[:limit]))
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _walk_folder(root: str, skip: set[str]) -> tuple[list[str], list[str], int]:
  """``(image paths, other files, files skipped)`` under ``root``, sorted by path.

  Sub-folders are followed, links to folders included (each real folder once, so a link loop
  ends); names starting with "." (hidden files, macOS ``._*`` companions) count as other
  files and hidden folders are not entered. Files whose real path is in ``skip`` are left out.
  Symbolic links named like images are kept even when they lead nowhere: reading them fails
  later and they are reported with the unreadable images.
  """
  images, others, skipped = [], [], 0
  seen: set[str] = set()
  for directory, dirs, files in os.walk(root, followlinks=True):
    real = os.path.realpath(directory)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      path = os.path.join(directory, name)
      if skip and os.path.realpath(path) in skip:
        skipped += 1
        continue
      if not name.startswith(".") and name.lower().endswith(FOLDER_IMAGE_EXTENSIONS):
        images.append(path)
      else:
        others.append(path)
  return sorted(images), sorted(others), skipped


class _CameraReader:
  """Reads the camera name of an image path under ``root`` (``data.cameras``)."""

  def __init__(self, root: str, source: str, folder_level: int, regex: str):
    self.root, self.source, self.level = root, source, int(folder_level)
    self.pattern = re.compile(regex) if source == "regex" else None
    if source not in CAMERA_SOURCES:
      raise DatasetError(
        f"data.cameras={source!r}: accepted: {', '.join(repr(c) for c in CAMERA_SOURCES)}"
      )
    if source == "folder" and self.level < 1:
      raise DatasetError(
        f"data.camera_folder_level={folder_level}: must be >= 1 (1 = the first "
        "sub-folder of data.root)"
      )

  def how(self) -> str:
    """How the camera is read, for messages."""
    if self.source == "folder":
      return f"the sub-folder at level {self.level} under data.root (data.camera_folder_level)"
    assert self.pattern is not None  # source == "regex"
    which = "group 1 of its first match" if self.pattern.groups else "its first match"
    return f"data.camera_regex '{self.pattern.pattern}' ({which} in the file name)"

  def name(self, path: str) -> str:
    """The camera name of ``path``; raises ``DatasetError`` saying why there is none."""
    if self.source == "folder":
      folders = os.path.relpath(path, self.root).split(os.sep)[:-1]
      if len(folders) < self.level:
        raise DatasetError(
          f"file {path!r} lies in {len(folders)} sub-folder(s) of data.root; "
          f"data.camera_folder_level={self.level} needs at least {self.level}"
        )
      return folders[self.level - 1]
    assert self.pattern is not None  # source == "regex"
    match = self.pattern.search(os.path.basename(path))
    name = None if match is None else match.group(1 if self.pattern.groups else 0)
    if not name:
      raise DatasetError(
        f"data.camera_regex '{self.pattern.pattern}' gives no camera for file {path!r}"
      )
    return name


def _warn_single_image_cameras(records: Sequence[Record], names: Sequence[str]) -> None:
  counts = collections.Counter(r.camera for r in records)
  single = [f"{names[i]!r}" for i in range(len(names)) if counts[i] == 1]
  if single:
    logger.warning(
      "dataset folder: %d camera(s) with a single image: %s. The camera-aware sampler and "
      "CA-Jaccard find no other image of the same camera for them; check "
      "data.camera_folder_level / data.camera_regex if these are not real cameras.",
      len(single),
      ", ".join(single[:MAX_LISTED]) + (" ..." if len(single) > MAX_LISTED else ""),
    )


def load_folder_dataset(
  root: str,
  *,
  cameras: str = "none",
  camera_folder_level: int = 1,
  camera_regex: str = r"c(\d+)",
  eval_list: str = "",
  skip_bad_names: bool = False,
  allow_outside_links: bool = False,
  min_images: int = 1,
) -> ReidDataset:
  """A user's own images as a training set (``data.name = "folder"``).

  Every image file under ``root`` (any sub-folders, any names; ``FOLDER_IMAGE_EXTENSIONS``)
  is a train record with ``identity = UNKNOWN_IDENTITY``. Other files are ignored (their count is
  logged), as are names starting with "." and the images the evaluation list names.

  Args:
    root: the folder of the training images (``data.root``).
    cameras: where the camera of an image comes from (``data.cameras``): "none" (every image
      gets camera 0: the camera-aware sampler then draws plain PxK batches), "folder" (the
      sub-folder at ``camera_folder_level``: 1 is the first level under ``root``) or "regex"
      (group 1 of the first match of ``camera_regex`` in the file name, or the whole match
      when it has no group). Camera names (any strings) become 0-based cameras in sorted order,
      numbers by value ("c2" before "c10"); the names are kept in ``camera_names`` and logged.
    camera_folder_level: see ``cameras``.
    camera_regex: see ``cameras``.
    eval_list: a query / gallery list file (``read_eval_list``), or "" for no evaluation
      (then ``query`` and ``gallery`` are empty and ``has_eval`` is False).
    skip_bad_names: leave out (logged, and listed in ``skipped``) the images that give no
      camera, instead of raising.
    allow_outside_links: read images that are (or lie in folders that are) symbolic links
      leading outside ``root``, and list entries outside the list file's folder.
    min_images: the fewest train images accepted (``folder_min_images``).

  Raises:
    DatasetError: ``root`` is not a folder or holds no image, fewer than ``min_images``
      images, images linked from outside ``root``, a regular expression or folder level that
      gives no file a camera (naming it and a sample file), or (without ``skip_bad_names``)
      images without a camera, listed together; the errors of ``read_eval_list``.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DatasetError(
      f"Dataset 'folder': data.root {root!r} is not a folder. Set "
      "--config.data.root to the folder that holds your training images."
    )
  reader = _CameraReader(root, cameras, camera_folder_level, camera_regex)
  query: list[Record] = []
  gallery: list[Record] = []
  skip: set[str] = set()
  if eval_list:
    query, gallery = read_eval_list(eval_list, allow_outside_links=allow_outside_links)
    skip = {os.path.realpath(p) for p in [eval_list] + [r.path for r in query + gallery]}
  paths, others, listed = _walk_folder(root, skip)
  if listed:
    logger.info(
      "dataset folder: %d file(s) under data.root are named by eval.list (the list, "
      "or query / gallery images) and are left out of training",
      listed,
    )
  if others:
    logger.info(
      "dataset folder: ignored %d file(s) that are not images (%s), e.g. %s",
      len(others),
      "/".join(FOLDER_IMAGE_EXTENSIONS),
      others[0],
    )
  if not paths:
    ignored = f" ({len(others)} other file(s) ignored, e.g. {others[0]!r})" if others else ""
    raise DatasetError(
      f"Dataset 'folder': no image file ({', '.join(FOLDER_IMAGE_EXTENSIONS)}) under "
      f"data.root {root!r}{ignored}. Put the training images (any names, in any sub-folders) "
      "there, or point --config.data.root at them."
    )
  contain = _Containment(root, allow_outside_links)
  paths = [p for p in paths if contain.keep(p)]
  outside = contain.error("Dataset 'folder'", "name images inside data.root")
  if outside is not None:
    raise outside
  names, bad, kept = [], [], []
  for path in paths:
    if cameras == "none":
      names.append("")
      kept.append(path)
      continue
    try:
      names.append(reader.name(path))
      kept.append(path)
    except DatasetError as exc:
      bad.append(str(exc))
  if bad and not kept:
    sample = os.path.relpath(paths[0], root) if cameras == "folder" else os.path.basename(paths[0])
    raise DatasetError(
      f"Dataset 'folder': no image under {root!r} gets a camera from {reader.how()}, e.g. "
      f"{sample!r}. Choose another "
      f"{'data.camera_folder_level' if cameras == 'folder' else 'data.camera_regex'}, or "
      "set --config.data.cameras=none."
    )
  if bad and not skip_bad_names:
    raise DatasetError(
      f"Dataset 'folder': {len(bad)} image(s) get no camera from {reader.how()}:\n"
      f"{_listed(bad)}\nMove or rename them, or skip them with "
      "--config.data.skip_bad_names=True."
    )
  if bad:
    logger.warning(
      "dataset folder: skipped %d image(s) without a camera (first: %s)", len(bad), bad[0]
    )
  camera_names: tuple[str, ...]
  if cameras == "none":
    indices, camera_names = [0] * len(kept), ()
  else:
    indices, camera_names = _camera_indices(names)
  train = [Record(path, UNKNOWN_IDENTITY, camera) for path, camera in zip(kept, indices)]
  check_folder_size(len(train), min_images, root)
  if cameras != "none":
    logger.info(
      "dataset folder: %d camera(s) from %s: %s",
      len(camera_names),
      reader.how(),
      _describe_cameras(camera_names),
    )
    _warn_single_image_cameras(train, camera_names)
  return ReidDataset(
    name=FOLDER_NAME,
    root=root,
    train=train,
    query=query,
    gallery=gallery,
    skipped=tuple(bad),
    camera_names=camera_names,
    has_cameras=cameras != "none",
  )


def check_folder_size(num_images: int, min_images: int, root: str) -> None:
  """Raises ``DatasetError`` when a folder dataset has fewer than ``min_images`` images."""
  if num_images < min_images:
    raise DatasetError(
      f"Dataset 'folder': {num_images} usable training image(s) under {root!r}; training "
      f"needs at least {min_images} (2 x max(train.num_instances, cluster.min_samples): two "
      "pseudo identities of a full batch block each). Add images, or lower "
      "--config.train.num_instances and --config.cluster.min_samples."
    )


_EVAL_LINE = "query|gallery <path> <identity> <camera>"


def read_eval_list(
  list_path: str, *, allow_outside_links: bool = False
) -> tuple[list[Record], list[Record]]:
  """The labelled query and gallery of a list file (``eval.list``): ``(query, gallery)``.

  One image per line, four whitespace-separated fields: ``query`` or ``gallery``, the image
  path (relative to the list file's folder, or absolute), its identity (an integer >= 0) and
  its camera (any name; names become 0-based cameras in sorted order, numbers by value). Text
  from a ``#`` at the start of a line or after a space is a comment; blank lines are skipped.
  Records keep the order of the file. Paths with spaces cannot be written.

  Paths must lie inside the list file's folder, and must not lead outside it through a
  symbolic link, unless ``allow_outside_links`` (``data.follow_symlinks_outside``).

  Raises:
    DatasetError: a missing list file, a malformed line (naming the file and the line), paths
      leading outside the folder (every one listed), no query or no gallery line.
  """
  list_path = os.path.abspath(os.path.expanduser(list_path))
  if not os.path.isfile(list_path):
    raise DatasetError(
      f"eval.list {list_path!r} is not a file (expected one line per image: '{_EVAL_LINE}')."
    )
  folder = os.path.dirname(list_path)
  contain = _Containment(folder, allow_outside_links, allow_outside_paths=allow_outside_links)
  entries: list[tuple[str, str, int, str]] = []
  with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
    for line_no, line in enumerate(f, start=1):
      text = re.sub(r"(^|\s)#.*$", "", line).strip()
      if not text:
        continue
      where = f"{list_path} line {line_no}"
      parts = text.split()
      if len(parts) != 4 or parts[0] not in ("query", "gallery") or not parts[2].isdigit():
        raise DatasetError(
          f"eval.list: {where} is malformed: {text!r} (expected '{_EVAL_LINE}', the identity an "
          "integer >= 0, e.g. 'query images/0001_a.jpg 1 cam2')."
        )
      split, written, identity_text, camera_name = parts
      path = os.path.normpath(os.path.join(folder, os.path.expanduser(written)))
      if contain.keep(path, where, written):
        entries.append((split, path, int(identity_text), camera_name))
  outside = contain.error(
    f"eval.list {list_path!r}",
    "list entries must name images inside the list file's folder "
    "(paths relative to it), or allow paths outside it with "
    "--config.data.follow_symlinks_outside=True",
  )
  if outside is not None:
    raise outside
  cameras, names = _camera_indices([camera_name for _, _, _, camera_name in entries])
  records: dict[str, list[Record]] = {"query": [], "gallery": []}
  for (split, path, identity, _), camera in zip(entries, cameras):
    records[split].append(Record(path, identity, camera))
  for split, found in records.items():
    if not found:
      raise DatasetError(
        f"eval.list {list_path!r} has no {split} line (expected lines "
        f"'{_EVAL_LINE}'; evaluation needs both a query and a gallery)."
      )
  logger.info(
    "eval list %s: %d query / %d gallery images, %d camera(s): %s",
    list_path,
    len(records["query"]),
    len(records["gallery"]),
    len(names),
    _describe_cameras(names),
  )
  return records["query"], records["gallery"]
