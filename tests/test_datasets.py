"""Dataset parsers on generated trees in the five real layouts, and their error messages."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.data import datasets
from ccreid_jax.data.datasets import DATASET_NAMES, DatasetError, load_dataset
from ccreid_jax.data.synthetic import FAKE_TREE_CAMERAS, fake_tree_sizes, make_fake_tree

# 0-based camera of each raw camera, per dataset.
_ZERO_BASED = {
  "market1501": lambda c: c - 1,
  "dukemtmcreid": lambda c: c - 1,
  "msmt17": lambda c: c - 1,
  "veri776": lambda c: c - 1,
  "personx": {3: 0, 4: 1, 8: 2, 10: 3, 11: 4, 12: 5}.__getitem__,
}


def _tiny_jpeg(path: str) -> None:
  Image.fromarray(np.full((16, 8, 3), 128, np.uint8)).save(path)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_parses_every_layout(tmp_path, name):
  folder = make_fake_tree(str(tmp_path), name, seed=3)
  assert os.path.basename(folder) == datasets.dataset_folder_name(name)
  ds = load_dataset(name, str(tmp_path))
  assert ds.name == name and ds.root == folder
  sizes = fake_tree_sizes(name)
  assert (len(ds.train), len(ds.query), len(ds.gallery)) == (
    sizes["train"],
    sizes["query"],
    sizes["gallery"],
  )

  cameras = [_ZERO_BASED[name](c) for c in FAKE_TREE_CAMERAS[name]]
  # Train: identity 1+k has two images in each of cameras[2k], cameras[2k+1].
  train = sorted((r.identity, r.camera) for r in ds.train)
  expected = sorted([(1 + k, cameras[2 * k + j]) for k in range(3) for j in (0, 1)] * 2)
  assert train == expected
  assert ds.num_train_identities == 3 and ds.num_train_cameras == 6
  assert sorted((r.identity, r.camera) for r in ds.query) == [(4, cameras[0]), (5, cameras[1])]
  gallery = sorted((r.identity, r.camera) for r in ds.gallery if r.identity != 0)
  assert gallery == [(4, cameras[2])] * 2 + [(5, cameras[3])] * 2
  # Deterministic order, real files, every camera 0-based.
  for split in (ds.train, ds.query, ds.gallery):
    assert [r.path for r in split] == sorted(r.path for r in split)
    assert all(os.path.isfile(r.path) for r in split)
    assert all(r.camera >= 0 for r in split)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_root_may_be_the_dataset_folder_itself(tmp_path, name):
  folder = make_fake_tree(str(tmp_path), name)
  a = load_dataset(name, str(tmp_path))
  b = load_dataset(name.upper(), folder)
  assert a == b


def test_market_junk_dropped_and_distractors_in_gallery_only(tmp_path):
  folder = make_fake_tree(str(tmp_path), "market1501")
  on_disk = os.listdir(os.path.join(folder, "bounding_box_train"))
  assert any(f.startswith("-1_c") for f in on_disk) and any(f.startswith("0000_") for f in on_disk)
  assert "notes.txt" in on_disk
  ds = load_dataset("market1501", str(tmp_path))
  everything = ds.train + ds.query + ds.gallery
  assert all(r.identity != -1 for r in everything)
  assert all(r.identity != 0 for r in ds.train + ds.query)
  distractors = [r for r in ds.gallery if r.identity == 0]
  assert len(distractors) == 2
  assert sorted(r.camera for r in distractors) == [4, 5]


def test_identity_zero_is_an_ordinary_identity_outside_market(tmp_path):
  folder = make_fake_tree(str(tmp_path), "msmt17")
  _tiny_jpeg(os.path.join(folder, "bounding_box_train", "0000_c3_9999.jpg"))
  ds = load_dataset("msmt17", str(tmp_path))
  assert (0, 2) in {(r.identity, r.camera) for r in ds.train}


def test_personx_camera_mapping(tmp_path):
  make_fake_tree(str(tmp_path), "personx")
  ds = load_dataset("personx", str(tmp_path))
  by_name = {os.path.basename(r.path): r.camera for r in ds.train}
  assert by_name["0001_c3_0000.jpg"] == 0
  assert by_name["0001_c4_0002.jpg"] == 1
  assert by_name["0002_c8_0004.jpg"] == 2
  assert by_name["0003_c12_0010.jpg"] == 5


def test_veri_three_digit_cameras(tmp_path):
  make_fake_tree(str(tmp_path), "veri776")
  ds = load_dataset("veri776", str(tmp_path))
  by_name = {os.path.basename(r.path): (r.identity, r.camera) for r in ds.train}
  assert by_name["0003_c020_00010050_0.jpg"] == (3, 19)


def test_msmt_official_list_layout(tmp_path):
  folder = make_fake_tree(str(tmp_path), "msmt17", msmt_official=True)
  assert os.path.isfile(os.path.join(folder, "list_val.txt"))
  ds = load_dataset("msmt17", str(tmp_path))
  cameras = [c - 1 for c in FAKE_TREE_CAMERAS["msmt17"]]
  assert len(ds.train) == 12 and len(ds.query) == 2 and len(ds.gallery) == 4
  # Train is list_train.txt (identities 1, 2) plus list_val.txt (identity 3).
  assert sorted({r.identity for r in ds.train}) == [1, 2, 3]
  assert sorted({r.camera for r in ds.train}) == sorted(cameras)
  assert all(f"{os.sep}train{os.sep}" in r.path for r in ds.train)
  assert all(f"{os.sep}test{os.sep}" in r.path for r in ds.query + ds.gallery)
  assert all(os.path.isfile(r.path) for r in ds.train + ds.query + ds.gallery)
  assert sorted((r.identity, r.camera) for r in ds.query) == [(4, cameras[0]), (5, cameras[1])]
  # The camera is the third '_' field of the official names.
  first = ds.train[0]
  assert int(os.path.basename(first.path).split("_")[2]) - 1 == first.camera


def test_msmt_official_camera_out_of_range(tmp_path):
  folder = make_fake_tree(str(tmp_path), "msmt17", msmt_official=True)
  with open(os.path.join(folder, "list_query.txt"), "a") as f:
    f.write("0009/0009_000_16_0303morning_0000_0.jpg 9\n")
  with pytest.raises(DatasetError, match=r"camera 16 .*0009_000_16_0303morning_0000_0\.jpg"):
    load_dataset("msmt17", str(tmp_path))


def test_unknown_name_lists_the_known_ones(tmp_path):
  with pytest.raises(DatasetError) as info:
    load_dataset("cuhk03", str(tmp_path))
  message = str(info.value)
  assert "cuhk03" in message
  assert all(n in message for n in DATASET_NAMES)
  assert isinstance(info.value, ValueError)


def test_missing_dataset_folder_shows_paths_and_expected_tree(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    load_dataset("market1501", str(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, DatasetError)
  assert "market1501" in message
  assert os.path.join(str(tmp_path), "Market-1501-v15.09.15") in message
  for part in (
    "Market-1501-v15.09.15/",
    "bounding_box_train/",
    "query/",
    "bounding_box_test/",
    "0002_c1s1_000451_03.jpg",
  ):
    assert part in message


def test_missing_split_folder(tmp_path):
  folder = make_fake_tree(str(tmp_path), "veri776")
  shutil.rmtree(os.path.join(folder, "image_query"))
  with pytest.raises(DatasetError) as info:
    load_dataset("veri776", str(tmp_path))
  message = str(info.value)
  assert "veri776" in message and os.path.join(folder, "image_query") in message
  assert "image_train/" in message


def test_empty_split(tmp_path):
  folder = make_fake_tree(str(tmp_path), "dukemtmcreid")
  query = os.path.join(folder, "query")
  for f in os.listdir(query):
    if f.endswith(".jpg"):
      os.remove(os.path.join(query, f))
  with pytest.raises(DatasetError, match="query split") as info:
    load_dataset("dukemtmcreid", str(tmp_path))
  assert query in str(info.value) and "DukeMTMC-reID/" in str(info.value)


def test_split_with_only_junk_is_empty(tmp_path):
  folder = make_fake_tree(str(tmp_path), "market1501")
  query = os.path.join(folder, "query")
  for f in os.listdir(query):
    if not f.startswith("-1_"):
      os.remove(os.path.join(query, f))
  with pytest.raises(DatasetError, match="empty"):
    load_dataset("market1501", str(tmp_path))


@pytest.mark.parametrize(
  "name,bad_file",
  [
    ("market1501", "0001_c7s1_000001_01.jpg"),
    ("dukemtmcreid", "0001_c9_f0000001.jpg"),
    ("msmt17", "0001_c16_0001.jpg"),
    ("veri776", "0001_c021_00000001_0.jpg"),
    ("personx", "0001_c5_0001.jpg"),
  ],
)
def test_camera_out_of_range_names_the_file(tmp_path, name, bad_file):
  folder = make_fake_tree(str(tmp_path), name)
  gallery = "image_test" if name == "veri776" else "bounding_box_test"
  _tiny_jpeg(os.path.join(folder, gallery, bad_file))
  with pytest.raises(ValueError) as info:
    load_dataset(name, str(tmp_path))
  assert isinstance(info.value, DatasetError)
  assert bad_file in str(info.value) and "out of range" in str(info.value)


def test_only_image_extensions_are_read(tmp_path):
  folder = make_fake_tree(str(tmp_path), "dukemtmcreid")
  train = os.path.join(folder, "bounding_box_train")
  Image.fromarray(np.zeros((16, 8, 3), np.uint8)).save(os.path.join(train, "0009_c1_f0000001.png"))
  _tiny_jpeg(os.path.join(train, "0009_c1_f0000002.jpeg"))
  with open(os.path.join(train, "0009_c1_f0000003.txt"), "w") as f:
    f.write("x")
  ds = load_dataset("dukemtmcreid", str(tmp_path))
  assert len([r for r in ds.train if r.identity == 9]) == 2


def test_benchmarks_have_evaluation_identities_and_cameras(tmp_path):
  """What a run asks a dataset before it trains: a benchmark always has a query / gallery,
  known train identities and cameras (a folder of own images may have none of them)."""
  make_fake_tree(str(tmp_path), "market1501", seed=0)
  ds = load_dataset("market1501", str(tmp_path))
  assert ds.has_eval and ds.has_train_identities and ds.has_cameras and ds.camera_names == ()
  assert all(" - " not in line for line in ds.summary().splitlines()[2:])
  no_eval = datasets.ReidDataset("folder", str(tmp_path), ds.train, [], ds.gallery)
  assert not no_eval.has_eval
  unknown = [datasets.Record(r.path, datasets.UNKNOWN_IDENTITY, r.camera) for r in ds.train]
  assert not datasets.ReidDataset("folder", str(tmp_path), unknown, [], []).has_train_identities
