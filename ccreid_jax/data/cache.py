"""Decode and resize every image once, optionally caching the result as a ``.npy`` file.

Because the training and test transforms both start with a bicubic resize (ALGORITHMS.md section
3), the whole dataset can be held as one uint8 array of shape (N, height, width, 3); every later
step (flip, pad, crop, normalise, erase) runs on the accelerator.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ccreid_jax.utils import progress_bar

__all__ = ["ImageDecodeError", "cache_file_name", "decode_image", "load_image_cache"]

_CACHE_VERSION = 1


class ImageDecodeError(OSError):
  """An image file could not be opened or decoded (missing, truncated, not an image)."""


def decode_image(path: str, height: int, width: int) -> np.ndarray:
  """Open ``path`` with PIL, convert to RGB and resize to (width, height) with BICUBIC.

  Returns:
    uint8 array of shape (height, width, 3).

  Raises:
    ImageDecodeError: naming the file, if it cannot be read or decoded.
  """
  try:
    with Image.open(path) as image:
      image.load()
      rgb = image.convert("RGB")
    if rgb.size != (width, height):
      rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
  except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... by format.
    raise ImageDecodeError(f"cannot read image file {path!r}: {exc}") from exc


def cache_file_name(paths: Sequence[str], height: int, width: int) -> str:
  """The cache file name for ``paths`` at ``height`` x ``width``.

  The name hashes every path (made absolute) with its file size and modification time
  (nanoseconds), plus the output size, so any change to the dataset or the size gives a new name.

  Raises:
    ImageDecodeError: if a file cannot be stat'ed.
  """
  entries = []
  for path in paths:
    try:
      st = os.stat(path)
    except OSError as exc:
      raise ImageDecodeError(f"cannot read image file {path!r}: {exc}") from exc
    entries.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  payload = json.dumps({"version": _CACHE_VERSION, "height": height, "width": width,
                        "files": entries}, separators=(",", ":"))
  digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]
  return f"images_{len(entries)}x{height}x{width}_{digest}.npy"


def _decode_into(out: np.ndarray, paths: Sequence[str], height: int, width: int, *,
                 progress: bool, num_workers: int) -> None:
  """Decode ``paths`` in a thread pool, writing image ``i`` into ``out[i]``."""

  def work(index: int) -> None:
    out[index] = decode_image(paths[index], height, width)

  bar = progress_bar(total=len(paths), desc=f"decode {height}x{width}", unit="img",
                     enabled=progress)
  try:
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
      for _ in pool.map(work, range(len(paths))):
        bar.update(1)
  finally:
    bar.close()


def load_image_cache(
    paths: Sequence[str],
    height: int,
    width: int,
    cache_dir: str | None,
    *,
    progress: bool = True,
    num_workers: int = 4,
) -> np.ndarray:
  """All images of ``paths`` as one uint8 array of shape (N, height, width, 3).

  Each image is opened with PIL, converted to RGB and resized once with BICUBIC (see
  ``decode_image``); decoding runs in a pool of ``num_workers`` threads with a tqdm progress
  bar (shown only when ``progress`` and stderr is a terminal).

  With ``cache_dir``, the array is written to ``cache_dir/<cache_file_name(...)>`` atomically
  (a temporary file renamed into place) and later calls return a read-only memory map of it
  without decoding anything. Without ``cache_dir`` an in-memory array is returned.

  Raises:
    ImageDecodeError: naming the file, for a missing, unreadable or truncated image.
  """
  paths = list(paths)
  shape = (len(paths), height, width, 3)
  if not paths:
    return np.zeros(shape, np.uint8)
  if cache_dir is None:
    out = np.empty(shape, np.uint8)
    _decode_into(out, paths, height, width, progress=progress, num_workers=num_workers)
    return out

  os.makedirs(cache_dir, exist_ok=True)
  final = os.path.join(cache_dir, cache_file_name(paths, height, width))
  if os.path.exists(final):
    try:
      cached = np.load(final, mmap_mode="r")
      if cached.shape == shape and cached.dtype == np.uint8:
        return cached
    except (OSError, ValueError):
      pass  # unreadable cache file: rebuild it below.

  tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    _decode_into(out, paths, height, width, progress=progress, num_workers=num_workers)
    out.flush()
    del out
    os.replace(tmp, final)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return np.load(final, mmap_mode="r")
