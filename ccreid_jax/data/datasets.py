"""Parsers for the re-identification datasets (docs/algorithms.md section 3).

Every parser reads identities and cameras from the *file name* (never from parent folders), keeps
only ``.jpg`` / ``.jpeg`` / ``.png`` files, sorts them by path for determinism and returns 0-based
camera ids. Person / vehicle ids are kept exactly as written in the file name (no relabelling):
unsupervised training never reads the train ids, and evaluation compares ids for equality only.

Supported datasets (``DATASET_NAMES``): Market-1501, DukeMTMC-reID, MSMT17 (Market-style converted
layout or the official ``list_*.txt`` layout), VeRi-776 and PersonX.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "Record",
    "ReidDataset",
    "dataset_folder_name",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("market1501", "dukemtmcreid", "msmt17", "veri776", "personx")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

MAX_LISTED = 10  # Bad file names listed in an error message; the rest are counted.

logger = logging.getLogger("ccreid_jax")


class DatasetError(FileNotFoundError, ValueError):
  """A dataset cannot be loaded: unknown name, missing folder, empty split or malformed file.

  Subclasses both ``FileNotFoundError`` (missing folders / files) and ``ValueError`` (bad names,
  out-of-range cameras), so either ``except`` clause catches it.
  """


class Record(NamedTuple):
  """One image of a split: its path, identity and 0-based camera id."""

  path: str
  pid: int
  camid: int


@dataclasses.dataclass(frozen=True)
class ReidDataset:
  """The three splits of a re-ID dataset.

  Attributes:
    name: one of ``DATASET_NAMES``.
    root: the dataset folder that was read (e.g. ``.../Market-1501-v15.09.15``).
    train: training images (junk and distractors removed).
    query: query images.
    gallery: gallery images (for Market-1501 including the distractors, pid 0).
    skipped: files left out because their names do not parse (``skip_bad_names=True``),
      one message naming the file and the reason each.
  """

  name: str
  root: str
  train: list[Record]
  query: list[Record]
  gallery: list[Record]
  skipped: tuple[str, ...] = ()

  @property
  def num_train_pids(self) -> int:
    """Number of distinct identities in the training split."""
    return len({r.pid for r in self.train})

  @property
  def num_train_cams(self) -> int:
    """Number of distinct cameras in the training split."""
    return len({r.camid for r in self.train})

  @property
  def num_train_images(self) -> int:
    """Number of training images."""
    return len(self.train)

  def summary(self) -> str:
    """A small human-readable table with ids / images / cameras per split."""
    lines = [f"{self.name} ({self.root})", "  split   | ids   | images | cameras"]
    for split_name, records in (("train", self.train), ("query", self.query),
                                ("gallery", self.gallery)):
      ids = len({r.pid for r in records})
      cams = len({r.camid for r in records})
      lines.append(f"  {split_name:<7} | {ids:>5} | {len(records):>6} | {cams:>7}")
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
  cam_to_index: Callable[[int], int | None]  # raw camera -> 0-based id, None if invalid
  cam_description: str
  example: str
  market_filters: bool  # pid 0 is a distractor (gallery only)


def _range_cams(low: int, high: int) -> Callable[[int], int | None]:
  """Cameras numbered ``low..high`` map to ``0..high-low``."""

  def to_index(cam: int) -> int | None:
    return cam - low if low <= cam <= high else None

  return to_index


_PERSONX_CAMS: dict[int, int] = {3: 0, 4: 1, 8: 2, 10: 3, 11: 4, 12: 5}

_MARKET_SPLITS = ("bounding_box_train", "query", "bounding_box_test")

_SPECS: dict[str, _Spec] = {
    "market1501": _Spec(
        name="market1501",
        folder="Market-1501-v15.09.15",
        split_dirs=_MARKET_SPLITS,
        pattern=re.compile(r"([-\d]+)_c(\d)"),
        cam_to_index=_range_cams(1, 6),
        cam_description="1..6",
        example="0002_c1s1_000451_03.jpg",
        market_filters=True,
    ),
    "dukemtmcreid": _Spec(
        name="dukemtmcreid",
        folder="DukeMTMC-reID",
        split_dirs=_MARKET_SPLITS,
        pattern=re.compile(r"([-\d]+)_c(\d)"),
        cam_to_index=_range_cams(1, 8),
        cam_description="1..8",
        example="0001_c2_f0046182.jpg",
        market_filters=False,
    ),
    "msmt17": _Spec(
        name="msmt17",
        folder="MSMT17_V1",
        split_dirs=_MARKET_SPLITS,
        pattern=re.compile(r"([-\d]+)_c(\d+)"),
        cam_to_index=_range_cams(1, 15),
        cam_description="1..15",
        example="0000_c1_0000.jpg",
        market_filters=False,
    ),
    "veri776": _Spec(
        name="veri776",
        folder="VeRi",
        split_dirs=("image_train", "image_query", "image_test"),
        pattern=re.compile(r"([\d]+)_c(\d+)"),
        cam_to_index=_range_cams(1, 20),
        cam_description="1..20",
        example="0001_c001_00016450_0.jpg",
        market_filters=False,
    ),
    "personx": _Spec(
        name="personx",
        folder="PersonX",
        split_dirs=_MARKET_SPLITS,
        pattern=re.compile(r"([-\d]+)_c([-\d]+)"),
        cam_to_index=_PERSONX_CAMS.get,
        cam_description="one of 3, 4, 8, 10, 11, 12",
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
        f"Unknown dataset name {name!r}; expected one of: {', '.join(DATASET_NAMES)}.")
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
        "      (each line: 'relative/path.jpg pid', e.g. "
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
      f"{_expected_tree(spec)}")


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
        f"Expected tree:\n{_expected_tree(spec)}")
  return sorted(f for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS)
                and (os.path.isfile(os.path.join(directory, f))
                     or os.path.islink(os.path.join(directory, f))))


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


class _Containment:
  """Collects image paths that lead outside the dataset folder.

  A path written outside the folder (``../``, an absolute path elsewhere) is always refused;
  a path inside it that resolves outside through a symbolic link (the image, or a folder on
  the way) only without ``allow_outside_links``. The dataset folder itself may be a link.
  """

  def __init__(self, folder: str, allow_outside_links: bool):
    self.folder = os.path.normpath(folder)
    self.real_folder = os.path.realpath(folder)
    self.allow_outside_links = allow_outside_links
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

  def error(self, spec: _Spec) -> DatasetError | None:
    """One error listing every refused path, or None."""
    lines = self.written_outside + self.linked_outside
    if not lines:
      return None
    listed = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    ways = []
    if self.written_outside:
      ways.append("list entries must name images inside the dataset folder (paths relative to "
                  "its train/ or test/ folder)")
    if self.linked_outside:
      ways.append("move the linked images into the dataset folder, or allow links that lead "
                  "outside it with --config.data.follow_symlinks_outside=True")
    way_out = "; ".join(ways)
    return DatasetError(
        f"Dataset {spec.name!r}: {len(lines)} image path(s) lead outside the dataset folder "
        f"{self.folder}:\n{listed}{more}\n{way_out[0].upper()}{way_out[1:]}.")


def _camera_index(spec: _Spec, cam: int, path: str) -> int:
  index = spec.cam_to_index(cam)
  if index is None:
    raise DatasetError(
        f"camera {cam} parsed from file {path!r} is out of range "
        f"(expected {spec.cam_description})")
  return index


def _parse_name(spec: _Spec, path: str) -> tuple[int, int]:
  """``(pid, raw camera)`` from a file name with the dataset's regular expression."""
  match = spec.pattern.search(os.path.basename(path))
  try:
    if match is None:
      raise ValueError
    return int(match.group(1)), int(match.group(2))
  except ValueError:  # no match, or a match such as "-" that is not a number.
    raise DatasetError(
        f"cannot parse id and camera from file {path!r} "
        f"(expected a name like {spec.example!r})") from None


def _keep(spec: _Spec, pid: int, split: str) -> bool:
  """Whether a record with ``pid`` belongs in ``split`` after junk / distractor filtering."""
  if pid == -1:  # junk images: dropped everywhere.
    return False
  if spec.market_filters and pid == 0:  # Market distractors: gallery only.
    return split == "gallery"
  return True


def _check_nonempty(spec: _Spec, records: Sequence[Record], split: str, where: str) -> None:
  if not records:
    raise DatasetError(
        f"Dataset {spec.name!r}: the {split} split read from {where!r} is empty "
        f"(no usable .jpg/.jpeg/.png images).\nExpected tree:\n{_expected_tree(spec)}")


# Each parser returns ``{split: (records, where)}`` (``where``: the folder or list file the
# split was read from, for the empty-split message) and appends one ``"<reason>"`` line per
# file whose name does not parse to ``bad``.
_Splits = dict[str, tuple[list[Record], str]]


def _parse_market_style(spec: _Spec, folder: str, bad: list[str],
                        contain: _Containment) -> _Splits:
  splits: _Splits = {}
  for split, sub in zip(("train", "query", "gallery"), spec.split_dirs):
    directory = os.path.join(folder, sub)
    records = []
    for fname in _list_images(directory, spec):
      path = os.path.join(directory, fname)
      if not contain.keep(path):
        continue
      try:
        pid, cam = _parse_name(spec, path)
        if not _keep(spec, pid, split):
          continue
        records.append(Record(path, pid, _camera_index(spec, cam, path)))
      except DatasetError as exc:
        bad.append(str(exc))
    splits[split] = (records, directory)
  return splits


def _msmt_official_cam(spec: _Spec, path: str) -> int:
  """Camera of an official MSMT17 file name: the third ``_``-separated field."""
  fields = os.path.basename(path).split("_")
  if len(fields) < 3 or not fields[2].isdigit():
    raise DatasetError(
        f"cannot parse the camera (third '_' field) from file {path!r} "
        "(expected a name like '0000_000_01_0303morning_0015_0.jpg')")
  return _camera_index(spec, int(fields[2]), path)


def _read_msmt_list(spec: _Spec, list_path: str, image_dir: str, bad: list[str],
                    contain: _Containment) -> list[Record]:
  if not os.path.isfile(list_path):
    raise DatasetError(
        f"Dataset {spec.name!r}: list file {list_path!r} is missing.\n"
        f"Expected tree:\n{_expected_tree(spec)}")
  records = []
  with open(list_path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DatasetError(
            f"Dataset {spec.name!r}: line {line_no} of {list_path!r} is malformed: "
            f"{line!r} (expected 'relative/path.jpg pid').")
      rel, pid_text = parts
      if not rel.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(image_dir, rel)
      if not contain.keep(path, f"{list_path} line {line_no}", rel):
        continue
      try:
        records.append(Record(path, int(pid_text), _msmt_official_cam(spec, path)))
      except DatasetError as exc:
        bad.append(str(exc))
  return records


def _parse_msmt_official(spec: _Spec, folder: str, bad: list[str],
                         contain: _Containment) -> _Splits:
  for sub in ("train", "test"):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise DatasetError(
          f"Dataset {spec.name!r}: image folder {os.path.join(folder, sub)!r} is missing.\n"
          f"Expected tree:\n{_expected_tree(spec)}")
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
      records += _read_msmt_list(spec, os.path.join(folder, list_name), image_dir, bad,
                                 contain)
    records = sorted(r for r in records if _keep(spec, r.pid, split))
    splits[split] = (records, os.path.join(folder, lists[0][0]))
  return splits


def _bad_names_error(spec: _Spec, bad: Sequence[str]) -> DatasetError:
  listed = "\n".join(f"  {line}" for line in bad[:MAX_LISTED])
  more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
  return DatasetError(
      f"Dataset {spec.name!r}: {len(bad)} file name(s) do not give an id and a camera "
      f"(pattern {spec.pattern.pattern} on the file name, e.g. {spec.example!r}, cameras "
      f"{spec.cam_description}):\n{listed}{more}\n"
      "Rename or remove these files, or skip them with --config.data.skip_bad_names=True.")


def load_dataset(name: str, root: str, *, skip_bad_names: bool = False,
                 allow_outside_links: bool = False) -> ReidDataset:
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
    A ``ReidDataset`` whose records are sorted by path, with 0-based camera ids and raw ids.

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
  outside = contain.error(spec)
  if outside is not None:
    raise outside
  if bad and not skip_bad_names:
    raise _bad_names_error(spec, bad)
  if bad:
    logger.warning("dataset %s: skipped %d file(s) whose names do not parse (first: %s)",
                   spec.name, len(bad), bad[0])
  for split, (records, where) in splits.items():
    _check_nonempty(spec, records, split, where)
  return ReidDataset(name=spec.name, root=folder, train=splits["train"][0],
                     query=splits["query"][0], gallery=splits["gallery"][0],
                     skipped=tuple(bad))
