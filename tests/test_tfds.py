"""TFDS (ArrayRecord) builds: same records and pixels as the folder loader, cache, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.data import cache, tfds_data
from ccreid_jax.data.cache import ImageDecodeError
from ccreid_jax.data.datasets import DATASET_NAMES, DatasetError, load_dataset
from ccreid_jax.data.synthetic import make_fake_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_records(dataset) -> dict[str, list[tuple[str, int, int]]]:
  """The folder loader's records per split, with paths relative to the dataset folder."""
  return {
    split: [
      (os.path.relpath(r.path, dataset.root).replace(os.sep, "/"), r.identity, r.camera)
      for r in getattr(dataset, split)
    ]
    for split in tfds_data.SPLITS
  }


def _tfds_records(dataset) -> dict[str, list[tuple[str, int, int]]]:
  return {split: [tuple(r) for r in getattr(dataset, split)] for split in tfds_data.SPLITS}


def _build(manual_dir, data_dir, name="market1501", **kwargs) -> str:
  return tfds_data.build(name, str(manual_dir), str(data_dir), progress=False, **kwargs)


@pytest.fixture(scope="module")
def market_build(tiny_market, tmp_path_factory) -> str:
  """The generated Market tree built as TFDS; returns the data_dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _build(tiny_market, data_dir)
  return data_dir


def test_build_holds_the_folder_loaders_records_in_order(tiny_market, market_build):
  folder = load_dataset("market1501", tiny_market)
  dataset, _, _ = tfds_data.load_tfds_dataset_images(
    "market1501", market_build, 16, 8, None, need_train=False, progress=False
  )
  assert _tfds_records(dataset) == _folder_records(folder)
  assert dataset.name == "market1501" and dataset.skipped == ()
  assert dataset.root == tfds_data.builder_dir("market1501", market_build)
  assert dataset.root.endswith(os.path.join("ccreid_market1501", "1.0.0"))


def test_images_stored_as_the_original_file_bytes(tiny_market, market_build):
  import tensorflow_datasets as tfds

  folder = load_dataset("market1501", tiny_market)
  builder = tfds.builder_from_directory(tfds_data.builder_dir("market1501", market_build))
  source = builder.as_data_source(split="query", decoders={"image": tfds.decode.SkipDecoding()})
  assert len(source) == len(folder.query)
  for i, record in enumerate(folder.query):
    with open(record.path, "rb") as f:
      assert source[i]["image"] == f.read()


def test_pixels_equal_the_folder_loader_and_cache_is_reused(
  tiny_market, market_build, tmp_path, monkeypatch
):
  folder = load_dataset("market1501", tiny_market)
  _, want_train, want_test = cache.load_dataset_images(folder, 32, 16, None, progress=False)
  cache_dir = str(tmp_path / "cache")
  dataset, train, test = tfds_data.load_tfds_dataset_images(
    "market1501", market_build, 32, 16, cache_dir, progress=False, num_workers=2
  )
  assert train.shape == (len(folder.train), 32, 16, 3) and train.dtype == np.uint8
  assert test.shape == (len(folder.query) + len(folder.gallery), 32, 16, 3)
  np.testing.assert_array_equal(train, want_train)
  np.testing.assert_array_equal(test, want_test)
  files = sorted(os.listdir(cache_dir))
  assert len(files) == 2 and all(f.startswith("tfds_ccreid_market1501_") for f in files)

  def fail(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")

  monkeypatch.setattr(cache, "decode_image", fail)
  again, train2, test2 = tfds_data.load_tfds_dataset_images(
    "market1501", market_build, 32, 16, cache_dir, progress=False
  )
  assert isinstance(train2, np.memmap) and isinstance(test2, np.memmap)
  np.testing.assert_array_equal(train2, want_train)
  np.testing.assert_array_equal(test2, want_test)
  assert again == dataset
  assert sorted(os.listdir(cache_dir)) == files
  _, no_train, test3 = tfds_data.load_tfds_dataset_images(
    "market1501", market_build, 32, 16, cache_dir, need_train=False, progress=False
  )
  assert no_train is None
  np.testing.assert_array_equal(test3, want_test)


def test_rebuild_gets_a_new_cache_file(tmp_path):
  make_fake_tree(str(tmp_path / "data"), "market1501")
  data_dir, cache_dir = tmp_path / "tfds", str(tmp_path / "cache")
  folder = _build(tmp_path / "data", data_dir)
  first = tfds_data.load_tfds_dataset_images(
    "market1501", str(data_dir), 16, 8, cache_dir, need_train=False, progress=False
  )[2]
  assert _build(tmp_path / "data", data_dir) == folder  # kept: nothing changes
  tfds_data.load_tfds_dataset_images(
    "market1501", str(data_dir), 16, 8, cache_dir, need_train=False, progress=False
  )
  assert len(os.listdir(cache_dir)) == 1
  _build(tmp_path / "data", data_dir, overwrite=True)
  second = tfds_data.load_tfds_dataset_images(
    "market1501", str(data_dir), 16, 8, cache_dir, need_train=False, progress=False
  )[2]
  assert len(os.listdir(cache_dir)) == 2
  np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize("name,official", [(n, False) for n in DATASET_NAMES] + [("msmt17", True)])
def test_every_layout_matches_the_folder_loader(tmp_path, name, official):
  make_fake_tree(str(tmp_path / "data"), name, msmt_official=official, height=12, width=6)
  folder = load_dataset(name, str(tmp_path / "data"))
  _build(tmp_path / "data", tmp_path / "tfds", name=name)
  dataset, train, test = tfds_data.load_tfds_dataset_images(
    name, str(tmp_path / "tfds"), 12, 6, None, progress=False
  )
  assert _tfds_records(dataset) == _folder_records(folder)
  if official:
    assert dataset.train[0].path.startswith("train/")
  _, want_train, want_test = cache.load_dataset_images(folder, 12, 6, None, progress=False)
  np.testing.assert_array_equal(train, want_train)
  np.testing.assert_array_equal(test, want_test)


def test_png_gray_and_16_bit_images_decode_like_the_folder_loader(tmp_path):
  folder_path = make_fake_tree(str(tmp_path / "data"), "msmt17")
  rng = np.random.default_rng(0)
  train_dir = os.path.join(folder_path, "bounding_box_train")
  Image.fromarray(rng.integers(0, 256, (30, 14, 4), np.uint8), "RGBA").save(
    os.path.join(train_dir, "0001_c1_9001.png")
  )
  Image.fromarray(rng.integers(0, 65536, (21, 9), np.uint16)).save(
    os.path.join(train_dir, "0002_c5_9002.png")
  )
  Image.fromarray(rng.integers(0, 256, (40, 20), np.uint8), "L").save(
    os.path.join(train_dir, "0003_c9_9003.jpg")
  )
  folder = load_dataset("msmt17", str(tmp_path / "data"))
  _build(tmp_path / "data", tmp_path / "tfds", name="msmt17")
  dataset, train, _ = tfds_data.load_tfds_dataset_images(
    "msmt17", str(tmp_path / "tfds"), 16, 8, None, progress=False
  )
  assert _tfds_records(dataset) == _folder_records(folder)
  _, want_train, _ = cache.load_dataset_images(folder, 16, 8, None, progress=False)
  np.testing.assert_array_equal(train, want_train)


def test_decode_image_from_bytes_equals_from_file(tmp_path):
  path = str(tmp_path / "a.png")
  Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)).save(path)
  with open(path, "rb") as f:
    data = f.read()
  np.testing.assert_array_equal(
    cache.decode_image("label", 9, 4, data=data), cache.decode_image(path, 9, 4)
  )
  with pytest.raises(ImageDecodeError, match="'label'"):
    cache.decode_image("label", 9, 4, data=data[:20])
  with pytest.raises(ValueError, match="file_name"):
    cache.load_image_cache(["x"], 9, 4, str(tmp_path), read=lambda i: data)


def test_bad_files_fail_the_build_or_are_skipped_and_listed(tmp_path):
  folder_path = make_fake_tree(str(tmp_path / "data"), "dukemtmcreid")
  bad_name = os.path.join(folder_path, "query", "nonsense.jpg")
  Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(bad_name)
  truncated = os.path.join(folder_path, "bounding_box_test", "0004_c3_f9999999.jpg")
  with open(truncated, "wb") as f:
    f.write(b"\xff\xd8\xff not really a jpeg")
  with pytest.raises(DatasetError, match="nonsense.jpg"):
    _build(tmp_path / "data", tmp_path / "tfds", name="dukemtmcreid")
  with pytest.raises(ImageDecodeError, match="--skip_bad_images"):
    _build(tmp_path / "data", tmp_path / "tfds", name="dukemtmcreid", skip_bad_names=True)
  assert not os.path.exists(tfds_data.builder_dir("dukemtmcreid", str(tmp_path / "tfds")))

  _build(
    tmp_path / "data",
    tmp_path / "tfds",
    name="dukemtmcreid",
    skip_bad_names=True,
    skip_bad_images=True,
  )
  folder, _, _ = cache.load_dataset_images(
    load_dataset("dukemtmcreid", str(tmp_path / "data"), skip_bad_names=True),
    1,
    1,
    None,
    skip_bad_images=True,
    progress=False,
  )
  dataset, _, _ = tfds_data.load_tfds_dataset_images(
    "dukemtmcreid", str(tmp_path / "tfds"), 8, 4, None, progress=False
  )
  assert _tfds_records(dataset) == _folder_records(folder)
  assert "gallery/0004_c3_f9999999.jpg" not in {r.path for r in dataset.gallery}
  assert len(dataset.skipped) == 2
  assert any("nonsense.jpg" in m for m in dataset.skipped)
  assert any("0004_c3_f9999999.jpg" in m for m in dataset.skipped)


def test_clear_errors(tmp_path):
  with pytest.raises(DatasetError, match="market1501, dukemtmcreid, msmt17, veri776, personx"):
    tfds_data.load_tfds_dataset_images("market", str(tmp_path), 8, 4, None)
  with pytest.raises(DatasetError, match="expected one of"):
    tfds_data.build("cuhk03", str(tmp_path), str(tmp_path))
  with pytest.raises(DatasetError) as info:
    tfds_data.load_tfds_dataset_images("veri776", str(tmp_path / "none"), 8, 4, None)
  message = str(info.value)
  assert "no TFDS build" in message and "ccreid_veri776/1.0.0/dataset_info.json" in message
  assert "python -m ccreid_jax.data.tfds_data --dataset veri776" in message
  (tmp_path / "data" / "VeRi").mkdir(parents=True)
  with pytest.raises(DatasetError, match="image_train"):  # the folder loader's expected tree
    _build(tmp_path / "data", tmp_path / "tfds", name="veri776")


def test_command_line(tmp_path, capsys):
  make_fake_tree(str(tmp_path / "data"), "personx")
  tfds_data.main(
    [
      "--dataset",
      "personx",
      "--manual_dir",
      str(tmp_path / "data"),
      "--data_dir",
      str(tmp_path / "tfds"),
    ]
  )
  out = capsys.readouterr().out
  assert "TFDS dataset ccreid_personx 1.0.0 ready in" in out
  assert "train 12, query 2, gallery 4" in out
  assert "--config.data.source=tfds" in out
  with pytest.raises(SystemExit) as info:
    tfds_data.main(
      [
        "--dataset",
        "personx",
        "--manual_dir",
        str(tmp_path / "empty"),
        "--data_dir",
        str(tmp_path / "tfds2"),
      ]
    )
  assert info.value.code == 1
  assert "PersonX" in capsys.readouterr().err


def test_reading_never_imports_tensorflow(market_build):
  code = (
    "import sys\n"
    "from ccreid_jax.data import tfds_data\n"
    "assert 'tensorflow_datasets' not in sys.modules\n"
    f"tfds_data.load_tfds_dataset_images('market1501', {market_build!r}, 8, 4, None,\n"
    "                                   progress=False)\n"
    "assert 'tensorflow_datasets' in sys.modules\n"
    "import json\n"
    "print(json.dumps(sorted(m for m in sys.modules\n"
    "                        if m == 'tensorflow' or m.startswith('tensorflow.'))))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_training_from_a_tfds_build_equals_training_from_the_folder(
  tiny_market, market_build, tmp_path
):
  """``config.data.source="tfds"``: the same run, epoch for epoch, as from the image files."""
  from ccreid_jax import train

  from conftest import tiny_config

  results = {}
  for source, root in (("folder", tiny_market), ("tfds", market_build)):
    config = tiny_config(root)
    config.data.source = source
    config.train.epochs = 1
    config.log.ranklist_queries = 2
    workdir = str(tmp_path / source)
    results[source] = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      results[source + "_records"] = [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")} for line in f
      ]
    # The rank list draws the cached images: the PNG exists and is not blank grey.
    image = np.asarray(Image.open(os.path.join(workdir, "ranklist_epoch0.png")))
    assert image.std() > 10
  assert results["tfds"] == results["folder"]
  assert results["tfds_records"] == results["folder_records"]


def test_tfds_data_source_by_name_reads_the_build(tiny_market, market_build):
  """``tfds.data_source("ccreid_market1501", data_dir=...)`` (builders registered on import)."""
  import tensorflow_datasets as tfds

  source = tfds.data_source(
    "ccreid_market1501",
    split="gallery",
    data_dir=market_build,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  folder = _folder_records(load_dataset("market1501", tiny_market))["gallery"]
  # The stored feature names stay those of the first builds ("pid", "camid"; tfds_data.py).
  got = [
    (r["path"].decode(), int(r["pid"]), int(r["camid"]))
    for r in (source[i] for i in range(len(source)))
  ]
  assert got == folder


def test_a_file_name_that_is_not_utf8_is_stored_and_read_back_as_its_bytes(tmp_path):
  """The build stores a path's bytes; reading gives the folder loader's path, so the train
  fingerprint (``data.source`` may change on resume) is the folder's."""
  from ccreid_jax.data import loading

  make_fake_tree(str(tmp_path / "manual"), "market1501", seed=2)
  folder = load_dataset("market1501", str(tmp_path / "manual"))
  first = folder.train[0].path
  os.rename(first, first[: -len(".jpg")] + os.fsdecode(b"_caf\xe9.jpg"))
  folder = load_dataset("market1501", str(tmp_path / "manual"))
  _build(tmp_path / "manual", tmp_path / "tfds")
  dataset, _, _ = tfds_data.load_tfds_dataset_images(
    "market1501", str(tmp_path / "tfds"), 16, 8, None, need_train=True, progress=False
  )
  assert _tfds_records(dataset) == _folder_records(folder)
  assert any(os.fsencode(r.path).endswith(b"_caf\xe9.jpg") for r in dataset.train)
  assert loading.train_fingerprint(dataset.train) == loading.train_fingerprint(folder.train)
