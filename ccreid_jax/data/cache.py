"""Decode and bicubic-resize every image once into a uint8 array, cached on disk.

The cache file is ``<cache_dir>/images-<hash>.npy`` where the hash covers the list of
paths, each file's size and modification time, and the target size: a changed dataset or
image size gives a new file. It is written atomically (temporary file + rename) and
memory-mapped on later runs, so the host keeps only the pages that batches touch.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Sequence

import numpy as np
from PIL import Image

from ccreid_jax.utils import progress_bar


class ImageDecodeError(ValueError):
  """An image file could not be read; the message names the file."""


def decode_resize(path: str, height: int, width: int) -> np.ndarray:
  """One image -> uint8 (height, width, 3), RGB, PIL bicubic resize."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
      return np.asarray(image, np.uint8)
  except (OSError, SyntaxError, ValueError) as error:
    raise ImageDecodeError(
        f"cannot read image {path!r}: {error}. Replace or remove the file "
        "(it may be truncated or not an image).") from error


def cache_key(paths: Sequence[str], height: int, width: int) -> str:
  digest = hashlib.sha256(f"{height}x{width}\n".encode())
  for path in paths:
    stat = os.stat(path)
    digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:24]


def load_image_cache(paths: Sequence[str], height: int, width: int, cache_dir: str | None, *,
                     progress: bool = True, num_workers: int = 4) -> np.ndarray:
  """uint8 (N, height, width, 3) images of ``paths``, from the cache when it is valid."""
  paths = list(paths)
  if cache_dir:
    cache_file = os.path.join(cache_dir, f"images-{cache_key(paths, height, width)}.npy")
    if os.path.exists(cache_file):
      cached = np.load(cache_file, mmap_mode="r")
      if cached.shape == (len(paths), height, width, 3) and cached.dtype == np.uint8:
        return cached
  images = np.empty((len(paths), height, width, 3), np.uint8)
  bar = progress_bar(total=len(paths), desc=f"decode {height}x{width}", unit="img",
                     enabled=progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(num_workers, 1)) as pool:
    for i, image in enumerate(pool.map(lambda p: decode_resize(p, height, width), paths)):
      images[i] = image
      bar.update(1)
  bar.close()
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache_file}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, images)
    os.replace(tmp, cache_file)
  return images
