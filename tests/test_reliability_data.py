"""Bad dataset files: unparsable names, unreadable images, unusual image modes."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.data import cache
from ccreid_jax.data.cache import ImageDecodeError, load_dataset_images, load_readable_images
from ccreid_jax.data.datasets import DatasetError, load_dataset
from ccreid_jax.data.synthetic import fake_tree_sizes, make_fake_tree


def _jpeg(path: str, value: int = 128) -> None:
  Image.fromarray(np.full((16, 8, 3), value, np.uint8)).save(path)


def _market(tmp_path) -> str:
  return make_fake_tree(str(tmp_path), "market1501", seed=1)


# ---------------------------------------------------------------------------------------
# File names.
# ---------------------------------------------------------------------------------------


def test_bad_names_are_listed_together_with_the_pattern(tmp_path):
  folder = _market(tmp_path)
  train = os.path.join(folder, "bounding_box_train")
  bad = [f"holiday_{i:02d}.jpg" for i in range(11)] + ["0003_c9s1_000001_01.jpg"]
  for name in bad:
    _jpeg(os.path.join(train, name))
  with pytest.raises(DatasetError) as info:
    load_dataset("market1501", str(tmp_path))
  message = str(info.value)
  assert "12 file name(s)" in message
  assert "0003_c9s1_000001_01.jpg" in message and "camera 9" in message
  assert "holiday_00.jpg" in message and "holiday_08.jpg" in message
  assert "holiday_09.jpg" not in message and "... and 2 more" in message  # first 10 only
  assert r"([-\d]+)_c(\d)" in message and "0002_c1s1_000451_03.jpg" in message
  assert "--config.data.skip_bad_names=True" in message


def test_skip_bad_names_keeps_the_rest(tmp_path, caplog):
  folder = _market(tmp_path)
  _jpeg(os.path.join(folder, "bounding_box_train", "no_camera_here.jpg"))
  _jpeg(os.path.join(folder, "query", "0004_c8s1_000001_00.jpg"))  # camera out of range
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    ds = load_dataset("market1501", str(tmp_path), skip_bad_names=True)
  sizes = fake_tree_sizes("market1501")
  assert (len(ds.train), len(ds.query), len(ds.gallery)) == (
    sizes["train"],
    sizes["query"],
    sizes["gallery"],
  )
  assert len(ds.skipped) == 2
  assert "no_camera_here.jpg" in ds.skipped[0] and "camera 8" in ds.skipped[1]
  assert "skipped 2 file(s)" in caplog.text


def test_msmt_official_bad_camera_can_be_skipped(tmp_path):
  folder = make_fake_tree(str(tmp_path), "msmt17", msmt_official=True)
  with open(os.path.join(folder, "list_query.txt"), "a") as f:
    f.write("0009/0009_000_16_0303morning_0000_0.jpg 9\n")
    f.write("0009/badname.jpg 9\n")
  with pytest.raises(DatasetError, match="2 file name"):
    load_dataset("msmt17", str(tmp_path))
  ds = load_dataset("msmt17", str(tmp_path), skip_bad_names=True)
  assert len(ds.query) == 2 and len(ds.skipped) == 2


def test_split_of_only_bad_names_is_still_an_empty_split(tmp_path):
  folder = _market(tmp_path)
  query = os.path.join(folder, "query")
  for name in os.listdir(query):
    os.remove(os.path.join(query, name))
  _jpeg(os.path.join(query, "unnamed.jpg"))
  with pytest.raises(DatasetError, match="query split .* is empty"):
    load_dataset("market1501", str(tmp_path), skip_bad_names=True)


# ---------------------------------------------------------------------------------------
# Paths leading outside the dataset folder.
# ---------------------------------------------------------------------------------------


def test_msmt_list_entries_outside_the_dataset_folder_are_refused(tmp_path):
  folder = make_fake_tree(str(tmp_path / "data"), "msmt17", msmt_official=True)
  secret = tmp_path / "secret"
  secret.mkdir()
  _jpeg(str(secret / "0009_000_01_0303morning_0000_0.jpg"))
  list_file = os.path.join(folder, "list_query.txt")
  with open(list_file) as f:
    num_lines = len(f.read().splitlines())
  with open(list_file, "a") as f:
    f.write("../../../secret/0009_000_01_0303morning_0000_0.jpg 9\n")
    f.write(f"{secret}/0009_000_01_0303morning_0000_0.jpg 9\n")
  with pytest.raises(DatasetError) as info:
    load_dataset("msmt17", str(tmp_path / "data"))
  message = str(info.value)
  assert list_file in message and folder in message
  assert f"line {num_lines + 1}" in message and "../../../secret/0009_000" in message
  assert f"line {num_lines + 2}" in message and f"{secret}/0009_000" in message
  # Not even with links allowed: the list itself names a file outside.
  with pytest.raises(DatasetError, match="outside"):
    load_dataset("msmt17", str(tmp_path / "data"), allow_outside_links=True)


def test_image_links_leading_outside_the_dataset_folder_are_refused(tmp_path):
  _market(tmp_path / "data")
  folder = os.path.join(tmp_path, "data", "Market-1501-v15.09.15")
  outside = tmp_path / "elsewhere.jpg"
  _jpeg(str(outside))
  link = os.path.join(folder, "query", "0004_c1s1_009999_00.jpg")
  os.symlink(outside, link)
  inside = os.path.join(folder, "query", "0005_c2s1_009999_00.jpg")
  os.symlink(
    os.path.join(
      folder, "bounding_box_test", sorted(os.listdir(os.path.join(folder, "bounding_box_test")))[0]
    ),
    inside,
  )
  with pytest.raises(DatasetError) as info:
    load_dataset("market1501", str(tmp_path / "data"))
  message = str(info.value)
  assert link in message and str(outside) in message and inside not in message
  assert "--config.data.follow_symlinks_outside=True" in message
  ds = load_dataset("market1501", str(tmp_path / "data"), allow_outside_links=True)
  assert link in [r.path for r in ds.query] and inside in [r.path for r in ds.query]
  # The dataset folder itself may be a link (datasets kept on another disk).
  os.remove(link)
  os.symlink(folder, tmp_path / "Market-1501-v15.09.15")
  ds = load_dataset("market1501", str(tmp_path))
  assert inside.replace(str(tmp_path / "data"), str(tmp_path)) in [r.path for r in ds.query]


# ---------------------------------------------------------------------------------------
# Unreadable images.
# ---------------------------------------------------------------------------------------


def _damage(ds):
  """Truncates the second train image, replaces the first gallery image by text."""
  truncated, not_image = ds.train[1].path, ds.gallery[0].path
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 3])
  with open(not_image, "w") as f:
    f.write("not a jpeg")
  return truncated, not_image


def test_unreadable_images_are_named_with_the_way_out(tmp_path):
  _market(tmp_path)
  ds = load_dataset("market1501", str(tmp_path))
  truncated, _ = _damage(ds)
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(ImageDecodeError) as info:
    load_dataset_images(ds, 16, 8, cache_dir, progress=False, num_workers=2)
  message = str(info.value)
  assert truncated in message
  assert "--config.data.skip_bad_images=True" in message
  with pytest.raises(ImageDecodeError, match="2 image files cannot be read"):
    cache.load_image_cache([r.path for r in ds.train + ds.gallery], 16, 8, None, progress=False)
  assert os.listdir(cache_dir) == []  # nothing half-written


def test_skip_bad_images_drops_their_records_and_caches_the_rest(tmp_path, monkeypatch):
  _market(tmp_path)
  ds = load_dataset("market1501", str(tmp_path))
  truncated, not_image = _damage(ds)
  cache_dir = str(tmp_path / "cache")
  out, train_images, test_images = load_dataset_images(
    ds, 16, 8, cache_dir, skip_bad_images=True, progress=False, num_workers=2
  )
  assert [r.path for r in out.train] == [r.path for r in ds.train if r.path != truncated]
  assert out.query == ds.query
  assert [r.path for r in out.gallery] == [r.path for r in ds.gallery[1:]]
  assert len(out.skipped) == 2 and truncated in out.skipped[0] and not_image in out.skipped[1]
  # Rows stay aligned with the records.
  assert train_images.shape == (len(out.train), 16, 8, 3)
  assert test_images.shape == (len(out.query) + len(out.gallery), 16, 8, 3)
  for i, record in enumerate(out.train):
    np.testing.assert_array_equal(train_images[i], cache.decode_image(record.path, 16, 8))
  for i, record in enumerate(out.query + out.gallery):
    np.testing.assert_array_equal(test_images[i], cache.decode_image(record.path, 16, 8))

  # A second start reads the list of unreadable files and the cache: nothing is decoded.
  def fail(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")

  monkeypatch.setattr(cache, "decode_image", fail)
  again, train_again, _ = load_dataset_images(
    ds, 16, 8, cache_dir, skip_bad_images=True, progress=False
  )
  assert again == out
  np.testing.assert_array_equal(train_again, train_images)


def test_dangling_and_looping_image_links_are_listed_as_unreadable(tmp_path):
  folder = _market(tmp_path)
  train = os.path.join(folder, "bounding_box_train")
  dangling = os.path.join(train, "0001_c1s1_009998_00.jpg")
  loop = os.path.join(train, "0001_c1s1_009999_00.jpg")
  os.symlink(os.path.join(train, "deleted.jpg"), dangling)
  os.symlink(loop, loop)
  ds = load_dataset("market1501", str(tmp_path))
  assert {dangling, loop} <= {r.path for r in ds.train}
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(ImageDecodeError) as info:
    load_dataset_images(ds, 16, 8, cache_dir, progress=False, num_workers=2)
  message = str(info.value)
  assert "2 image files cannot be read" in message
  assert dangling in message and "deleted.jpg" in message and loop in message
  assert "--config.data.skip_bad_images=True" in message
  out, train_images, _ = load_dataset_images(
    ds, 16, 8, cache_dir, skip_bad_images=True, progress=False, num_workers=2
  )
  assert len(out.train) == len(ds.train) - 2 and train_images.shape[0] == len(out.train)
  assert sorted(m.split("'")[1] for m in out.skipped) == [dangling, loop]


def test_readable_images_without_a_cache_dir(tmp_path):
  paths = []
  for i in range(4):
    paths.append(str(tmp_path / f"{i}.jpg"))
    _jpeg(paths[-1], value=40 * i)
  (tmp_path / "2.jpg").write_bytes(b"")
  readable = load_readable_images(paths, 16, 8, None, progress=False)
  assert readable.kept.tolist() == [0, 1, 3]
  assert readable.images.shape == (3, 16, 8, 3)
  assert [int(readable.images[j, 0, 0, 0]) for j in range(3)] == [0, 40, 120]
  assert "2.jpg" in readable.bad[0]


def test_all_good_images_share_the_plain_cache_file(tmp_path):
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.jpg"))
    _jpeg(paths[-1], value=50 * i)
  cache_dir = str(tmp_path / "cache")
  readable = load_readable_images(paths, 16, 8, cache_dir, progress=False)
  assert readable.bad == () and readable.kept.tolist() == [0, 1, 2]
  assert os.listdir(cache_dir) == [cache.cache_file_name(paths, 16, 8)]


def test_stale_temporary_cache_file_of_a_dead_process_is_removed(tmp_path):
  path = str(tmp_path / "a.jpg")
  _jpeg(path)
  cache_dir = tmp_path / "cache"
  cache_dir.mkdir()
  final = cache_dir / cache.cache_file_name([path], 16, 8)
  stale = f"{final}.tmp-999999999-deadbeef"  # no such pid
  with open(stale, "wb") as f:
    f.write(b"half written")
  cache.load_image_cache([path], 16, 8, str(cache_dir), progress=False)
  assert sorted(os.listdir(cache_dir)) == [final.name]


# ---------------------------------------------------------------------------------------
# Image modes.
# ---------------------------------------------------------------------------------------


def test_every_image_mode_becomes_rgb(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(20, 10, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, size=(20, 10), dtype=np.uint8)
  files = {}

  files["gray.jpg"] = Image.fromarray(gray)
  files["gray_alpha.png"] = Image.fromarray(np.stack([gray, gray], -1), "LA")
  files["rgba.png"] = Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA")
  palette = Image.fromarray(rgb).quantize(colors=16)
  files["palette.png"] = palette
  files["palette.gif"] = palette
  files["cmyk.jpg"] = Image.fromarray(rgb).convert("CMYK")
  files["gray16.png"] = Image.fromarray(gray.astype(np.uint16) * 257)
  for name, image in files.items():
    path = str(tmp_path / name)
    if name == "palette.png":
      image.save(path, transparency=0)
    else:
      image.save(path)
  out = {name: cache.decode_image(str(tmp_path / name), 20, 10) for name in files}
  for name, array in out.items():
    assert array.shape == (20, 10, 3) and array.dtype == np.uint8, name
  for name in ("gray_alpha.png", "gray16.png"):
    np.testing.assert_array_equal(out[name], np.repeat(gray[..., None], 3, -1), err_msg=name)
  np.testing.assert_array_equal(out["rgba.png"], rgb)  # alpha dropped
  expanded = np.asarray(palette.convert("RGB"))
  np.testing.assert_array_equal(out["palette.png"], expanded)
  np.testing.assert_array_equal(out["palette.gif"], expanded)
  assert np.abs(out["cmyk.jpg"].astype(int) - rgb).mean() < 20  # lossy JPEG, same picture
  assert (out["gray.jpg"][..., 0] == out["gray.jpg"][..., 2]).all()


def _pgm16(path, values):
  """A binary PGM of maxval 65535 (``.pgm`` is an advertised extension)."""
  height, width = values.shape
  with open(path, "wb") as f:
    f.write(f"P5\n{width} {height}\n65535\n".encode() + values.astype(">u2").tobytes())


def test_high_bit_depths_are_scaled_never_clipped_to_a_blank_image(tmp_path, caplog):
  """A 16-bit PGM, 32-bit integer TIFFs and a float TIFF decode to their picture (PIL's
  convert("RGB") gave white, white and black); values no scale fits are refused, naming the
  file; the inference path decodes them as the cache does."""
  gray = np.random.default_rng(1).integers(0, 256, size=(20, 10)).astype(np.uint8)
  want = np.repeat(gray[..., None], 3, -1)
  _pgm16(tmp_path / "gray16.pgm", gray.astype(np.uint16) * 256 + 100)  # 8 high bits: gray
  int32 = np.round(gray * ((2**31 - 1) / 255)).astype(np.int32)  # 255 -> 2**31 - 1
  Image.fromarray(int32, "I").save(tmp_path / "int32.tif")
  Image.fromarray(gray.astype(np.float32) / 255, "F").save(tmp_path / "float.tif")
  for name in ("gray16.pgm", "int32.tif", "float.tif"):
    np.testing.assert_array_equal(
      cache.decode_image(str(tmp_path / name), 20, 10), want, err_msg=name
    )
  # Unsigned 32-bit samples (PIL holds them as int32) use the whole 32-bit range. PIL writes
  # "I" as signed: the SampleFormat tag (339, SHORT, 1 value) is changed from 2 to 1.
  uint32 = (gray.astype(np.uint32) * 16843009).view(np.int32)  # 255 -> 2**32 - 1
  Image.fromarray(uint32, "I").save(tmp_path / "uint32.tif")
  signed = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00"
  data = (tmp_path / "uint32.tif").read_bytes()
  assert data.count(signed) == 1
  (tmp_path / "uint32.tif").write_bytes(data.replace(signed, signed[:-2] + b"\x01\x00"))
  np.testing.assert_array_equal(cache.decode_image(str(tmp_path / "uint32.tif"), 20, 10), want)
  Image.fromarray(gray.astype(np.float32), "F").save(tmp_path / "float255.tif")
  Image.fromarray(gray.astype(np.int32) - 128, "I").save(tmp_path / "negative.tif")
  with pytest.raises(ImageDecodeError, match=r"float255\.tif.*values in \[1, 255\].*\[0, 1\]"):
    cache.decode_image(str(tmp_path / "float255.tif"), 20, 10)
  with pytest.raises(ImageDecodeError, match=r"negative\.tif.*negative values"):
    cache.decode_image(str(tmp_path / "negative.tif"), 20, 10)
  # What Embedder.load_images calls for files (no cache folder): the same pictures, no
  # warning about single-colour images.
  paths = [str(tmp_path / n) for n in ("gray16.pgm", "int32.tif", "float.tif")]
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    images = cache.load_image_cache(paths, 20, 10, None, progress=False)
  assert (images == want).all() and "single colour" not in caplog.text


def test_single_colour_images_are_kept_and_named_in_a_warning(tmp_path, caplog):
  _pgm16(tmp_path / "white16.pgm", np.full((20, 10), 65535, np.uint16))
  _jpeg(str(tmp_path / "gray.jpg"), 128)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 8, 3), np.uint8)).save(
    tmp_path / "picture.png"
  )
  paths = [str(tmp_path / n) for n in ("white16.pgm", "picture.png", "gray.jpg")]
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    images = cache.load_image_cache(paths, 16, 8, str(tmp_path / "cache"), progress=False)
  assert images.shape == (3, 16, 8, 3) and (images[0] == 255).all()
  assert "2 image(s) decode to a single colour (the first: RGB [255, 255, 255]" in caplog.text
  assert "white16.pgm" in caplog.text and "gray.jpg" in caplog.text
  assert "picture.png" not in caplog.text
