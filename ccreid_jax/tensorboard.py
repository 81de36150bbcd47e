"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow needed).

``TensorBoardWriter(logdir)`` writes scalars and images; without tensorboardX installed it
does nothing (and says so once per process). ``write_record(kind, **values)`` takes the same
arguments as ``utils.MetricsWriter.write``, so every ``metrics.jsonl`` record can go to
TensorBoard too, under these tags and steps:

* step = number of epochs done: 0 for the ``initial`` record, ``epoch + 1`` for the record of
  ``epoch`` (the same numbering as the checkpoints);
* ``eval/mAP``, ``eval/rank1``, ... (evaluation), ``train/loss``, ``train/lr``,
  ``cluster/clusters``, ``cluster/outliers``, ``cluster/cluster_ari``, ``cluster/rlcc_*``,
  ``time/<phase>`` (seconds); ``kind``, ``time``, ``epoch`` and ``steps`` are not written.

``read_scalars`` / ``read_images`` read event files back (a reader of the TFRecord format that
checks the checksums, using tensorboardX's protobuf definitions), for tests and notebooks.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
  "TensorBoardWriter",
  "read_images",
  "read_scalars",
  "record_scalars",
  "record_step",
]

logger = logging.getLogger("ccreid_jax")

_warned_missing = False  # The "tensorboardX is not installed" warning is given once.

_EVAL_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")
_SKIPPED_KEYS = ("kind", "time", "epoch", "steps")


def record_step(kind: str, values: Mapping[str, Any]) -> int:
  """The TensorBoard step of a metrics record: the number of epochs done."""
  if kind == "initial":
    return 0
  if "epoch" not in values:
    raise ValueError(f"a {kind!r} record needs an 'epoch' field to have a step.")
  return int(values["epoch"]) + 1


def _tag(key: str) -> str:
  if key in _EVAL_KEYS:
    return f"eval/{key}"
  if key.startswith("time_"):
    return f"time/{key[len('time_') :]}"
  if key in (
    "clusters",
    "outliers",
    "cluster_ari",
    "camera_ari",
    "one_camera_clusters",
    "largest_cluster",
    "intra_similarity",
    "camera_proxies",
  ) or key.startswith("rlcc_"):
    return f"cluster/{key}"
  if key in ("loss", "lr", "camera_loss"):
    return f"train/{key}"
  return f"other/{key}"


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def record_scalars(values: Mapping[str, Any]) -> dict[str, float]:
  """The TensorBoard tags and values of a metrics record (numbers only; NaN kept)."""
  return {
    _tag(k): float(v) for k, v in sorted(values.items()) if k not in _SKIPPED_KEYS and _is_number(v)
  }


class TensorBoardWriter:
  """Scalars and images into ``logdir`` (a no-op without tensorboardX).

  Args:
    logdir: the folder of the event files (created).
    purge_step: for a resumed run, the first step it will write again; TensorBoard then hides
      the events an earlier attempt wrote at that step or later.
    enabled: False makes a writer that does nothing (``config.log.tensorboard = False``).
  """

  def __init__(self, logdir: str, *, purge_step: int | None = None, enabled: bool = True):
    global _warned_missing
    self.logdir = logdir
    self._writer = None
    if not enabled:
      return
    try:
      import tensorboardX
    except ImportError:
      if not _warned_missing:
        _warned_missing = True
        logger.warning(
          "tensorboardX is not installed: no TensorBoard event files are written "
          "(pip install tensorboardX); metrics.jsonl has every value."
        )
      return
    os.makedirs(logdir, exist_ok=True)
    self._writer = tensorboardX.SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes each number of ``values`` under its key as tag; other values are skipped."""
    if self._writer is None:
      return
    for tag, value in values.items():
      if _is_number(value):
        self._writer.add_scalar(tag, float(value), global_step=int(step))

  def image(self, tag: str, step: int, image: Image.Image) -> None:
    """Writes ``image`` (any PIL mode; stored as RGB PNG) under ``tag``."""
    if self._writer is None:
      return
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    self._writer.add_image(tag, pixels, global_step=int(step), dataformats="HWC")

  def write_record(self, kind: str, **values: Any) -> None:
    """A ``metrics.jsonl`` record (``MetricsWriter.write``'s arguments) as scalars."""
    self.scalars(record_step(kind, values), record_scalars(values))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> TensorBoardWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


# ---------------------------------------------------------------------------------------
# Reading event files back.
# ---------------------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
  from tensorboardX.crc32c import crc32c

  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path: str):
  """The payloads of a TFRecord file; raises ValueError on a checksum mismatch.

  A truncated last record (a file still being written) ends the iteration.
  """
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      length, length_crc = struct.unpack("<QI", header)
      if _masked_crc(header[:8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length")
      data = f.read(length)
      footer = f.read(4)
      if len(data) < length or len(footer) < 4:
        return
      if _masked_crc(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path}: corrupt record data")
      yield data


def _events(logdir: str):
  from tensorboardX.proto import event_pb2

  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for data in _read_records(path):
      event = event_pb2.Event()
      event.ParseFromString(data)
      yield event


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every scalar in ``logdir``'s event files, in file order."""
  out: dict[str, list[tuple[int, float]]] = {}
  for event in _events(logdir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out


def read_images(logdir: str) -> dict[str, list[tuple[int, Image.Image]]]:
  """``{tag: [(step, image), ...]}`` of every image in ``logdir``'s event files."""
  out: dict[str, list[tuple[int, Image.Image]]] = {}
  for event in _events(logdir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "image":
        image = Image.open(io.BytesIO(value.image.encoded_image_string))
        image.load()
        out.setdefault(value.tag, []).append((int(event.step), image))
  return out
