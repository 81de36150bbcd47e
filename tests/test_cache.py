"""The uint8 image cache: exact PIL bicubic values, reuse, invalidation, clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.data import cache
from ccreid_jax.data.cache import ImageDecodeError, load_image_cache


def _reference(path: str, height: int, width: int) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))


@pytest.fixture
def images(tmp_path) -> list[str]:
  """Five files: JPEGs of different sizes, a grayscale JPEG, an RGBA PNG, one already 24x12."""
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w, mode) in enumerate(
    [(40, 20, "RGB"), (33, 17, "RGB"), (50, 30, "L"), (24, 12, "RGBA"), (24, 12, "RGB")]
  ):
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
    ext = "png" if mode == "RGBA" else "jpg"
    path = str(tmp_path / f"img{i}.{ext}")
    image.save(path)
    paths.append(path)
  return paths


def test_values_equal_pil_bicubic(images):
  out = load_image_cache(images, 24, 12, None, progress=False, num_workers=2)
  assert out.shape == (5, 24, 12, 3) and out.dtype == np.uint8
  for i, path in enumerate(images):
    np.testing.assert_array_equal(out[i], _reference(path, 24, 12))
  single = load_image_cache(images, 24, 12, None, progress=False, num_workers=1)
  np.testing.assert_array_equal(single, out)


def test_empty_list(tmp_path):
  out = load_image_cache([], 8, 4, str(tmp_path), progress=False)
  assert out.shape == (0, 8, 4, 3) and out.dtype == np.uint8


def test_cache_reused_without_decoding(images, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / "cache")
  first = np.array(load_image_cache(images, 24, 12, cache_dir, progress=False))
  files = os.listdir(cache_dir)
  assert len(files) == 1 and files[0].endswith(".npy")

  def fail(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")

  monkeypatch.setattr(cache, "decode_image", fail)
  second = load_image_cache(images, 24, 12, cache_dir, progress=False)
  assert isinstance(second, np.memmap)  # memory-mapped from the .npy file
  np.testing.assert_array_equal(second, first)
  assert os.listdir(cache_dir) == files


def _counting_decoder(monkeypatch) -> list[str]:
  calls: list[str] = []
  real = cache.decode_image

  def counting(path, height, width):
    calls.append(path)
    return real(path, height, width)

  monkeypatch.setattr(cache, "decode_image", counting)
  return calls


def test_changed_file_invalidates(images, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / "cache")
  before = np.array(load_image_cache(images, 24, 12, cache_dir, progress=False))
  # Overwrite one image with different content, then pin a different mtime.
  Image.fromarray(np.zeros((40, 20, 3), np.uint8)).save(images[0])
  stat = os.stat(images[0])
  os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

  calls = _counting_decoder(monkeypatch)
  after = load_image_cache(images, 24, 12, cache_dir, progress=False)
  assert len(calls) == len(images)
  assert len(os.listdir(cache_dir)) == 2
  np.testing.assert_array_equal(after[0], _reference(images[0], 24, 12))
  np.testing.assert_array_equal(after[1:], before[1:])
  assert not np.array_equal(after[0], before[0])


def test_touched_file_or_new_order_invalidates(images, tmp_path):
  cache_dir = str(tmp_path / "cache")
  load_image_cache(images, 24, 12, cache_dir, progress=False)
  stat = os.stat(images[2])
  os.utime(images[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
  load_image_cache(images, 24, 12, cache_dir, progress=False)
  reordered = load_image_cache(images[::-1], 24, 12, cache_dir, progress=False)
  assert len(os.listdir(cache_dir)) == 3
  np.testing.assert_array_equal(reordered[0], _reference(images[-1], 24, 12))


def test_other_size_gets_its_own_file(images, tmp_path):
  cache_dir = str(tmp_path / "cache")
  small = load_image_cache(images, 24, 12, cache_dir, progress=False)
  large = load_image_cache(images, 32, 16, cache_dir, progress=False)
  assert small.shape == (5, 24, 12, 3) and large.shape == (5, 32, 16, 3)
  assert len(os.listdir(cache_dir)) == 2
  np.testing.assert_array_equal(large[1], _reference(images[1], 32, 16))
  assert cache.cache_file_name(images, 24, 12) != cache.cache_file_name(images, 32, 16)


def test_truncated_jpeg_names_the_file(images, tmp_path):
  with open(images[1], "rb") as f:
    data = f.read()
  with open(images[1], "wb") as f:
    f.write(data[: len(data) // 2])
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(ImageDecodeError) as info:
    load_image_cache(images, 24, 12, cache_dir, progress=False)
  assert images[1] in str(info.value)
  assert os.listdir(cache_dir) == []  # no partial or temporary cache file left behind


def test_missing_and_non_image_files(tmp_path):
  not_image = tmp_path / "fake.jpg"
  not_image.write_bytes(b"this is text, not a jpeg")
  with pytest.raises(ImageDecodeError, match="fake.jpg"):
    load_image_cache([str(not_image)], 8, 4, None, progress=False)
  with pytest.raises(ImageDecodeError, match="missing.jpg"):
    load_image_cache([str(tmp_path / "missing.jpg")], 8, 4, str(tmp_path / "c"), progress=False)


# ---------------------------------------------------------------------------------------
# A full disk (issue 38, item 4): an error naming the space and the folder, not a SIGBUS.
# ---------------------------------------------------------------------------------------


def test_a_cache_that_does_not_fit_is_refused_before_anything_is_decoded(
  images, tmp_path, monkeypatch
):
  import collections
  import shutil

  from ccreid_jax import main

  cache_dir = str(tmp_path / "cache")
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
  calls = _counting_decoder(monkeypatch)
  with pytest.raises(cache.CacheSpaceError) as info:
    load_image_cache(images, 24, 12, cache_dir, progress=False)
  needed = 5 * 24 * 12 * 3 + 4096
  message = str(info.value)
  assert f"needs 0.0 MiB ({needed} bytes) in {cache_dir}" in message
  assert "only 0.0 MiB is free" in message and "--config.data.cache_dir" in message
  assert calls == [] and os.listdir(cache_dir) == []
  assert main.exit_code_of(info.value) == 1  # "error: ..." on the command line, no traceback


def test_running_out_of_space_is_an_error_while_the_file_is_reserved(images, tmp_path, monkeypatch):
  """The file is allocated (``posix_fallocate``) before it is written through its memory map:
  a full disk raises ENOSPC there, where a write into the map would kill the process with a
  bus error. The real case: a 700 KB tmpfs as the workdir."""
  import errno

  if not hasattr(os, "posix_fallocate"):
    pytest.skip("no posix_fallocate on this platform")
  allocated = []

  def full(fd, offset, length):
    allocated.append((offset, length))
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "posix_fallocate", full)
  calls = _counting_decoder(monkeypatch)
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(cache.CacheSpaceError, match=r"The image cache needs .* in .*cache"):
    load_image_cache(images, 24, 12, cache_dir, progress=False)
  header = 128  # the .npy header of a 4-d uint8 array
  assert allocated == [(0, header + 5 * 24 * 12 * 3)]
  assert calls == [] and os.listdir(cache_dir) == []  # nothing decoded, no temporary file
  monkeypatch.undo()
  assert load_image_cache(images, 24, 12, cache_dir, progress=False).shape == (5, 24, 12, 3)
