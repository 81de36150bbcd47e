"""Decode and resize every image once, optionally caching the result as a ``.npy`` file.

Because the training and test transforms both start with a bicubic resize (docs/algorithms.md
section 3), the whole dataset can be held as one uint8 array of shape (N, height, width, 3); every
later step (flip, pad, crop, normalise, erase) runs on the accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ccreid_jax.data.datasets import DatasetError, ReidDataset
from ccreid_jax.utils import progress_bar, write_atomic

__all__ = [
  "CacheSpaceError",
  "ImageDecodeError",
  "ReadableImages",
  "cache_file_name",
  "decode_image",
  "load_dataset_images",
  "load_image_cache",
  "load_readable_images",
]

logger = logging.getLogger("ccreid_jax")

MAX_LISTED = 10  # Unreadable files listed in an error message; the rest are counted.

_CACHE_VERSION = 1


class ImageDecodeError(OSError):
  """An image file could not be opened or decoded (missing, truncated, not an image)."""


class CacheSpaceError(OSError):
  """The image cache does not fit on the disk of its folder (``data.cache_dir``)."""


def _integer_depth(image: Image.Image) -> tuple[int, bool]:
  """``(bits, signed)`` of the samples of a PIL "I" (32-bit integer) image.

  PIL reads a PGM / PPM of maxval above 255 into "I" scaled to 16 bits, a 16-bit PNG as 16
  bits, and a TIFF as its BitsPerSample / SampleFormat tags say; anything else as PIL's own
  signed 32 bits.
  """
  if image.format in ("PPM", "PNG"):
    return 16, False
  if image.format == "TIFF":
    tags = getattr(image, "tag_v2", {})  # a TiffImageFile's tags (mypy sees a plain Image)
    bits = tags.get(258, (32,))  # BitsPerSample
    sample_format = tags.get(339, (1,))  # 1: unsigned, 2: signed, 3: float
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return int(bits), int(sample_format) == 2
  return 32, True


def _high_depth_gray(image: Image.Image) -> np.ndarray | None:
  """The uint8 gray levels of a 16-bit, 32-bit integer or floating-point grayscale image, or
  None for the other modes (``convert("RGB")`` handles them).

  Integers are scaled by the range of their bit depth (16 bits: the 8 high bits; 32 bits:
  ``x * 255 / (2**32 - 1)``, or ``2**31 - 1`` when signed); floats must lie in [0, 1] and
  are scaled by 255. PIL's own ``convert("RGB")`` would clip integers at 255 (a white
  image) and floats to 0 or 1 (a black one).

  Raises:
    ValueError: negative integers, or floats outside [0, 1] (or not finite): no scale to read
      them with.
  """
  if image.mode.startswith("I;16"):
    # 16-bit grayscale: keep the 8 high bits (convert("RGB") would clip at 255).
    return (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
  if image.mode == "I":
    bits, signed = _integer_depth(image)
    values = np.asarray(image).astype(np.int64)
    if not signed and bits == 32:
      values &= 0xFFFFFFFF  # PIL holds unsigned 32-bit samples as int32
    if values.size and values.min() < 0:
      raise ValueError(
        f"a signed {bits}-bit integer image with negative values (minimum "
        f"{values.min()}): it has no range to read it as RGB with"
      )
    if bits <= 16 and not signed:
      return (values >> (bits - 8) if bits > 8 else values).astype(np.uint8)
    top = (1 << (bits - 1 if signed else bits)) - 1
    return np.round(np.minimum(values, top) * (255.0 / top)).astype(np.uint8)
  if image.mode == "F":
    values = np.asarray(image).astype(np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
      raise ValueError(
        f"a floating-point image with values in [{np.nanmin(values):g}, "
        f"{np.nanmax(values):g}]: only values in [0, 1] are read (as 0-255)"
      )
    return np.round(values * 255.0).astype(np.uint8)
  return None


def decode_image(path: str, height: int, width: int, *, data: bytes | None = None) -> np.ndarray:
  """Open ``path`` with PIL, convert to RGB and resize to (width, height) with BICUBIC.

  Any mode PIL reads becomes RGB: grayscale is replicated, palette images are expanded, an
  alpha channel is dropped (not composited), CMYK is converted. High bit depths are scaled
  by their range (16-bit grayscale, PGM of maxval above 255 included, keeps its 8 high bits;
  32-bit integers ``x * 255 / max``; floats in [0, 1] times 255), never clipped into a white
  or black image; negative integers and floats outside [0, 1] are refused.

  Args:
    path: the image file; with ``data``, only the name used in error messages.
    height: output height.
    width: output width.
    data: the encoded file content (e.g. stored in a TFDS record), decoded instead of reading
      ``path``; the result is the same as for a file holding these bytes.

  Returns:
    uint8 array of shape (height, width, 3).

  Raises:
    ImageDecodeError: naming the file, if it cannot be read or decoded.
  """
  try:
    with Image.open(path if data is None else io.BytesIO(data)) as image:
      image.load()
      gray = _high_depth_gray(image)
      rgb = image.convert("RGB") if gray is None else Image.fromarray(gray).convert("RGB")
    if rgb.size != (width, height):
      rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
  except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... by format.
    reason = (_broken_link(path) if data is None else None) or exc
    raise ImageDecodeError(f"cannot read image file {path!r}: {reason}") from exc


def _broken_link(path: str) -> str | None:
  """What is wrong with ``path`` when it is a symbolic link that leads to no file."""
  if not os.path.islink(path) or os.path.exists(path):
    return None
  try:
    os.stat(path)
  except OSError as exc:
    if exc.errno == errno.ELOOP:
      return "a symbolic link loop"
  try:
    target = os.readlink(path)
  except OSError:
    return None
  return f"a symbolic link to {target!r}, which does not exist"


def cache_file_name(paths: Sequence[str], height: int, width: int) -> str:
  """The cache file name for ``paths`` at ``height`` x ``width``.

  The name hashes every path (made absolute) with its file size and modification time
  (nanoseconds), plus the output size, so any change to the dataset or the size gives a new name.
  A file that cannot be stat'ed (missing, a dangling link, a link loop) enters as size and
  time -1; decoding it then names it with the other unreadable images.
  """
  entries = []
  for path in paths:
    try:
      st = os.stat(path)
    except OSError:
      entries.append([os.path.abspath(path), -1, -1])
      continue
    entries.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  payload = json.dumps(
    {"version": _CACHE_VERSION, "height": height, "width": width, "files": entries},
    separators=(",", ":"),
  )
  digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]
  return f"images_{len(entries)}x{height}x{width}_{digest}.npy"


def _decode_into(
  out: np.ndarray,
  paths: Sequence[str],
  height: int,
  width: int,
  *,
  progress: bool,
  num_workers: int,
  read: Callable[[int], bytes] | None = None,
) -> list[tuple[int, str]]:
  """Decode ``paths`` in a thread pool, writing image ``i`` into ``out[i]``.

  With ``read``, image ``i`` is decoded from the bytes ``read(i)`` returns (called from the
  pool's threads) and ``paths[i]`` only names it in error messages.

  Images that decode to a single colour (a blank frame, or a file whose values no scale
  fits) are kept and logged as a warning naming them: they carry no appearance to learn.

  Returns:
    ``(index, message)`` of every image that could not be decoded (its row is left as is).
  """
  errors: list[tuple[int, str]] = []
  constant: list[int] = []

  def work(index: int) -> None:
    try:
      if read is None:
        image = decode_image(paths[index], height, width)
      else:
        image = decode_image(paths[index], height, width, data=read(index))
    except ImageDecodeError as exc:
      errors.append((index, str(exc)))  # list.append is atomic under the GIL.
      return
    out[index] = image
    if (image == image[0, 0]).all():
      constant.append(index)

  bar = progress_bar(
    total=len(paths), desc=f"decode {height}x{width}", unit="img", enabled=progress
  )
  try:
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
      for _ in pool.map(work, range(len(paths))):
        bar.update(1)
  finally:
    bar.close()
  if constant:
    constant.sort()
    listed = ", ".join(repr(paths[i]) for i in constant[:MAX_LISTED])
    more = f" and {len(constant) - MAX_LISTED} more" if len(constant) > MAX_LISTED else ""
    logger.warning(
      "%d image(s) decode to a single colour (the first: RGB %s everywhere): "
      "%s%s. They are used as they are; remove them if they are not pictures",
      len(constant),
      out[constant[0]][0, 0].tolist(),
      listed,
      more,
    )
  return sorted(errors)


SKIP_HINT = "skip unreadable images with --config.data.skip_bad_images=True"


def _decode_error(
  errors: Sequence[tuple[int, str]], skip_hint: str = SKIP_HINT
) -> ImageDecodeError:
  """One error listing the first ``MAX_LISTED`` unreadable files, with ``skip_hint``."""
  if len(errors) == 1:
    return ImageDecodeError(f"{errors[0][1]}\nReplace or remove the file, or {skip_hint}.")
  listed = "\n".join(f"  {message}" for _, message in errors[:MAX_LISTED])
  more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
  return ImageDecodeError(
    f"{len(errors)} image files cannot be read:\n{listed}{more}\nReplace or remove them, "
    f"or {skip_hint}."
  )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. EPERM: it exists, owned by someone else.
    return True
  return True


def _remove_stale_tmp(final: str) -> None:
  """Removes ``<final>.tmp-<pid>-*`` files of processes that died while writing them."""
  for tmp in glob.glob(glob.escape(final) + ".tmp-*"):
    try:
      pid = int(tmp[len(final) + len(".tmp-") :].split("-")[0])
    except ValueError:
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      with contextlib.suppress(OSError):
        os.remove(tmp)


def _open_cached(final: str, shape: tuple[int, ...]) -> np.ndarray | None:
  """The cache file ``final`` as a read-only memory map if it holds ``shape`` uint8."""
  if not os.path.exists(final):
    return None
  try:
    cached = np.load(final, mmap_mode="r")
  except (OSError, ValueError):
    return None  # unreadable cache file: the caller rebuilds it.
  if cached.shape == shape and cached.dtype == np.uint8:
    return cached
  return None


def _megabytes(size: int) -> str:
  return f"{size / 2**20:.1f} MiB"


def _space_error(folder: str, needed: int, free: int | None) -> CacheSpaceError:
  have = "not enough" if free is None else f"only {_megabytes(free)}"
  return CacheSpaceError(
    f"The image cache needs {_megabytes(needed)} ({needed} bytes) in {folder} "
    f"(config.data.cache_dir; by default <workdir>/cache), and {have} is free there. Free "
    "some space, or point --config.data.cache_dir at a disk with room."
  )


def _check_space(folder: str, needed: int) -> None:
  """Refuses a cache of ``needed`` bytes that the disk of ``folder`` cannot hold."""
  try:
    free = shutil.disk_usage(folder).free
  except OSError:
    return  # no figure to check against: the allocation below still refuses cleanly.
  if free < needed:
    raise _space_error(folder, needed, free)


def _allocate(path: str) -> None:
  """Reserves the disk blocks of the (sparse) file ``path``, so that writing it through a
  memory map cannot run out of space: a full disk is an ``OSError`` here instead of a
  SIGBUS (a bus error that kills the process) in the middle of decoding.

  Raises:
    CacheSpaceError: the disk has no room for the file.
  """
  if not hasattr(os, "posix_fallocate"):
    return
  size = os.path.getsize(path)
  fd = os.open(path, os.O_RDWR)
  try:
    os.posix_fallocate(fd, 0, size)
  except OSError as exc:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
      raise _space_error(os.path.dirname(os.path.abspath(path)), size, None) from exc
    # EOPNOTSUPP, EINVAL: a file system without it; the space check above is all there is.
  finally:
    os.close(fd)


def _write_atomically(
  final: str, shape: tuple[int, ...], fill: Callable[[np.ndarray], None]
) -> np.ndarray:
  """Fills a new ``.npy`` file through ``fill`` and renames it to ``final`` when complete.

  If ``fill`` raises (or the process dies), no partial ``final`` exists; the temporary
  file is removed (or, after a crash, by the next call for the same ``final``). The space
  the file needs is checked before anything is decoded, and reserved before it is written.

  Raises:
    CacheSpaceError: the disk of ``final``'s folder has no room for the file.
  """
  _remove_stale_tmp(final)
  folder = os.path.dirname(os.path.abspath(final))
  needed = math.prod(shape) + 4096  # the array and its header (at most 4 KiB)
  _check_space(folder, needed)
  tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    try:
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as exc:
      if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise _space_error(folder, needed, None) from exc
      raise
    _allocate(tmp)
    fill(out)
    out.flush()
    del out
    os.replace(tmp, final)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return np.load(final, mmap_mode="r")


def load_image_cache(
  paths: Sequence[str],
  height: int,
  width: int,
  cache_dir: str | None,
  *,
  progress: bool = True,
  num_workers: int = 4,
  read: Callable[[int], bytes] | None = None,
  file_name: str | None = None,
  skip_hint: str = SKIP_HINT,
) -> np.ndarray:
  """All images of ``paths`` as one uint8 array of shape (N, height, width, 3).

  Each image is opened with PIL, converted to RGB and resized once with BICUBIC (see
  ``decode_image``); decoding runs in a pool of ``num_workers`` threads with a tqdm progress
  bar (shown only when ``progress`` and stderr is a terminal).

  With ``cache_dir``, the array is written to ``cache_dir/<cache_file_name(...)>`` atomically
  (a temporary file renamed into place) and later calls return a read-only memory map of it
  without decoding anything. Without ``cache_dir`` an in-memory array is returned.

  Images that are not files (e.g. records of a TFDS dataset) are decoded from ``read(i)``,
  the encoded bytes of image ``i``; ``paths`` then only name them in error messages, and
  ``file_name`` (required with ``cache_dir``) names the cache file in place of
  ``cache_file_name``, which needs files to stat. ``skip_hint`` ends the error: the way to
  skip unreadable images that applies where the images are loaded.

  Raises:
    ImageDecodeError: naming the files (the first ``MAX_LISTED``), for missing, unreadable or
      truncated images; every image is tried before raising.
    CacheSpaceError: the cache file does not fit in ``cache_dir`` (checked before decoding).
    ValueError: ``read`` and ``cache_dir`` without ``file_name``.
  """
  paths = list(paths)
  shape = (len(paths), height, width, 3)
  if read is not None and cache_dir is not None and not file_name:
    raise ValueError("load_image_cache: `read` with a `cache_dir` needs a `file_name`")
  if not paths:
    return np.zeros(shape, np.uint8)

  def fill(out: np.ndarray) -> None:
    errors = _decode_into(
      out, paths, height, width, progress=progress, num_workers=num_workers, read=read
    )
    if errors:
      raise _decode_error(errors, skip_hint)

  if cache_dir is None:
    out = np.empty(shape, np.uint8)
    fill(out)
    return out
  os.makedirs(cache_dir, exist_ok=True)
  final = os.path.join(cache_dir, file_name or cache_file_name(paths, height, width))
  cached = _open_cached(final, shape)
  if cached is not None:
    return cached
  return _write_atomically(final, shape, fill)


# ---------------------------------------------------------------------------------------
# Skipping unreadable images.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadableImages:
  """What ``load_readable_images`` returns.

  Attributes:
    images: (M, height, width, 3) uint8, the readable images in the order of ``paths``.
    kept: (M,) int64 index into ``paths`` of each row of ``images``.
    bad: one message per unreadable file, naming it.
  """

  images: np.ndarray
  kept: np.ndarray
  bad: tuple[str, ...]


def _bad_list_file(final: str) -> str:
  return final[: -len(".npy")] + ".unreadable.json"


def load_readable_images(
  paths: Sequence[str],
  height: int,
  width: int,
  cache_dir: str | None,
  *,
  progress: bool = True,
  num_workers: int = 4,
) -> ReadableImages:
  """Like ``load_image_cache`` but leaves unreadable images out instead of raising.

  Images are decoded once. When every image is readable the cache file is the one
  ``load_image_cache`` writes. Otherwise the readable rows are cached under the name of the
  readable paths and the unreadable ones are listed in ``<cache name>.unreadable.json``
  (keyed by all paths), so later calls memory-map the cache without decoding anything.
  """
  paths = list(paths)
  shape = (len(paths), height, width, 3)
  everything = np.arange(len(paths), dtype=np.int64)
  if not paths:
    return ReadableImages(np.zeros(shape, np.uint8), everything, ())

  if cache_dir is None:
    out = np.empty(shape, np.uint8)
    errors = _decode_into(out, paths, height, width, progress=progress, num_workers=num_workers)
    bad_index = {i for i, _ in errors}
    kept = np.array([i for i in everything if i not in bad_index], np.int64)
    images = out[kept] if errors else out
    return ReadableImages(images, kept, tuple(m for _, m in errors))

  os.makedirs(cache_dir, exist_ok=True)
  final = os.path.join(cache_dir, cache_file_name(paths, height, width))
  bad_file = _bad_list_file(final)
  if os.path.exists(bad_file):
    try:
      with open(bad_file) as f:
        listed = [(int(i), str(m)) for i, m in json.load(f)["unreadable"]]
    except (OSError, ValueError, KeyError, TypeError):
      listed = None  # damaged list: decode again below.
    if listed is not None:
      bad_index = {i for i, _ in listed}
      kept = np.array([i for i in everything if i not in bad_index], np.int64)
      images = load_image_cache(
        [paths[i] for i in kept],
        height,
        width,
        cache_dir,
        progress=progress,
        num_workers=num_workers,
      )
      return ReadableImages(images, kept, tuple(m for _, m in listed))
  cached = _open_cached(final, shape)
  if cached is not None:
    return ReadableImages(cached, everything, ())

  errors = []

  def fill(out: np.ndarray) -> None:
    errors.extend(
      _decode_into(out, paths, height, width, progress=progress, num_workers=num_workers)
    )
    if errors:
      raise _SkipFinal

  try:
    images = _write_atomically(final, shape, fill)
    return ReadableImages(images, everything, ())
  except _SkipFinal:
    pass
  # Some images are unreadable: decode the readable ones into their own cache file. They
  # are decoded a second time; this happens once per dataset, and only when files are bad.
  bad_index = {i for i, _ in errors}
  kept = np.array([i for i in everything if i not in bad_index], np.int64)
  kept_paths = [paths[i] for i in kept]
  images = load_image_cache(
    kept_paths, height, width, cache_dir, progress=progress, num_workers=num_workers
  )
  write_atomic(bad_file, json.dumps({"unreadable": [[i, m] for i, m in errors]}, indent=1))
  return ReadableImages(images, kept, tuple(m for _, m in errors))


class _SkipFinal(Exception):
  """Raised inside ``fill`` to abandon the all-paths cache file when images are bad."""


def load_dataset_images(
  dataset: ReidDataset,
  height: int,
  width: int,
  cache_dir: str | None,
  *,
  need_train: bool = True,
  skip_bad_images: bool = False,
  progress: bool = True,
  num_workers: int = 4,
) -> tuple[ReidDataset, np.ndarray | None, np.ndarray]:
  """The decoded images of a dataset: ``(dataset, train_images, test_images)``.

  ``test_images`` holds the query images followed by the gallery images;
  ``train_images`` is None unless ``need_train``. With ``skip_bad_images`` unreadable files
  are left out: the returned dataset drops their records (logged, and added to
  ``dataset.skipped``), so records and image rows stay aligned. Without it the first
  unreadable files are named in an ``ImageDecodeError``.

  Raises:
    ImageDecodeError: unreadable images (without ``skip_bad_images``).
    CacheSpaceError: the cache does not fit in ``cache_dir``.
    DatasetError: a split left without any readable image.
  """

  def load(records):
    """(images, indices of the records kept, messages of the unreadable files)."""
    paths = [r.path for r in records]
    if not skip_bad_images:
      images = load_image_cache(
        paths, height, width, cache_dir, progress=progress, num_workers=num_workers
      )
      return images, list(range(len(records))), ()
    readable = load_readable_images(
      paths, height, width, cache_dir, progress=progress, num_workers=num_workers
    )
    return readable.images, [int(i) for i in readable.kept], readable.bad

  train, train_images, bad = list(dataset.train), None, ()
  if need_train:
    train_images, kept, bad = load(train)
    train = [train[i] for i in kept]
  test = list(dataset.query) + list(dataset.gallery)
  test_images, kept, test_bad = load(test)
  bad = tuple(bad) + tuple(test_bad)
  if not bad:
    return dataset, train_images, test_images
  num_query = len(dataset.query)
  query = [test[i] for i in kept if i < num_query]
  gallery = [test[i] for i in kept if i >= num_query]
  logger.warning(
    "dataset %s: skipped %d unreadable image(s) (first: %s)", dataset.name, len(bad), bad[0]
  )
  for split, records, before in (
    ("train", train, dataset.train),
    ("query", query, dataset.query),
    ("gallery", gallery, dataset.gallery),
  ):
    if before and not records:  # a split with no records at all (no query) stays empty.
      raise DatasetError(
        f"Dataset {dataset.name!r}: no readable image is left in the {split} "
        f"split ({len(bad)} unreadable files, first: {bad[0]})"
      )
  filtered = dataclasses.replace(
    dataset, train=train, query=query, gallery=gallery, skipped=dataset.skipped + bad
  )
  return filtered, train_images, test_images
