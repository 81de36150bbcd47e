"""The synthetic demo dataset: layout, file names, id structure, determinism, idempotence."""

import collections
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.data.datasets import load_dataset
from ccreid_jax.data.synthetic import generate_market_dataset

_SMALL = dict(num_train_ids=6, num_test_ids=5, num_cams=4, images_per_cam=(2, 3), height=32,
              width=16)
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c([1-6])s1_(\d{6})_(\d{2})\.jpg$")


def _files(folder: str) -> dict[str, bytes]:
  """Relative path -> bytes of every file under ``folder``."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("synthetic"))
  generate_market_dataset(root, seed=5, **_SMALL)
  return root


def test_layout_and_file_names(small):
  folder = os.path.join(small, "Market-1501-v15.09.15")
  assert sorted(os.listdir(folder)) == [
      ".synthetic.json", "bounding_box_test", "bounding_box_train", "query"]
  for split in ("bounding_box_train", "query", "bounding_box_test"):
    names = os.listdir(os.path.join(folder, split))
    assert names and all(_MARKET_NAME.match(n) for n in names), names
  # Every image is a 32x16 RGB JPEG.
  sample = os.path.join(folder, "query", sorted(os.listdir(os.path.join(folder, "query")))[0])
  with Image.open(sample) as image:
    assert image.format == "JPEG" and image.size == (16, 32) and image.mode == "RGB"
  # Unique names across the whole dataset.
  all_names = [n for s in ("bounding_box_train", "query", "bounding_box_test")
               for n in os.listdir(os.path.join(folder, s))]
  assert len(all_names) == len(set(all_names))


def test_identity_structure(small):
  ds = load_dataset("market1501", small)
  train_ids = {r.pid for r in ds.train}
  query_ids = {r.pid for r in ds.query}
  gallery_ids = {r.pid for r in ds.gallery} - {0}
  assert train_ids == set(range(1, 7))
  assert query_ids == set(range(7, 12))
  assert query_ids <= gallery_ids and gallery_ids == query_ids
  assert not train_ids & (query_ids | gallery_ids)

  cams_of = collections.defaultdict(set)
  per_cam = collections.Counter()
  for r in ds.train + ds.query + ds.gallery:
    if r.pid != 0:
      cams_of[r.pid].add(r.camid)
      per_cam[r.pid, r.camid] += 1
  assert all(len(c) >= 2 for c in cams_of.values())
  assert all(c <= {0, 1, 2, 3} for c in cams_of.values())
  assert all(2 <= n <= 3 for n in per_cam.values())

  # Query: one image from each of one or two cameras of each test id; each query has a
  # cross-camera match in the gallery.
  q_per_id = collections.Counter(r.pid for r in ds.query)
  assert all(1 <= n <= 2 for n in q_per_id.values())
  assert all(len({r.camid for r in ds.query if r.pid == pid}) == n for pid, n in q_per_id.items())
  gallery_pairs = {(r.pid, r.camid) for r in ds.gallery}
  for q in ds.query:
    assert any(pid == q.pid and cam != q.camid for pid, cam in gallery_pairs)

  # Distractors (pid 0) kept in the gallery; junk (pid -1) on disk, dropped by the parser.
  assert sum(r.pid == 0 for r in ds.gallery) == max(1, 5 // 5)
  gallery_dir = os.path.join(small, "Market-1501-v15.09.15", "bounding_box_test")
  assert sum(n.startswith("-1_c") for n in os.listdir(gallery_dir)) == max(1, 5 // 10)


def test_identities_differ_and_images_vary(small):
  ds = load_dataset("market1501", small)

  def load(r):
    return np.asarray(Image.open(r.path), np.float32)

  a, b = [r for r in ds.train if r.pid == 1][:2]
  assert not np.array_equal(load(a), load(b))  # per-image nuisance
  means = {pid: np.mean([load(r).mean((0, 1)) for r in ds.train if r.pid == pid], axis=0)
           for pid in range(1, 7)}
  assert len({tuple(np.round(m)) for m in means.values()}) == 6


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  kwargs = dict(_SMALL, num_train_ids=3, num_test_ids=2)
  a = generate_market_dataset(str(tmp_path / "a"), seed=1, **kwargs)
  b = generate_market_dataset(str(tmp_path / "b"), seed=1, **kwargs)
  c = generate_market_dataset(str(tmp_path / "c"), seed=2, **kwargs)
  files_a, files_b, files_c = _files(a), _files(b), _files(c)
  assert files_a == files_b
  images_a = {k: v for k, v in files_a.items() if k.endswith(".jpg")}
  images_c = {k: v for k, v in files_c.items() if k.endswith(".jpg")}
  assert images_a != images_c
  common = set(images_a) & set(images_c)
  assert all(images_a[k] != images_c[k] for k in common)


def test_worker_processes_write_the_same_bytes(tmp_path):
  # Identities render in parallel; the frame numbers in the names run across identities,
  # so this fails if the parent assigned them in another order or a worker drew differently.
  kwargs = dict(_SMALL, num_train_ids=5, num_test_ids=4)
  one = generate_market_dataset(str(tmp_path / "one"), seed=3, **kwargs)
  two = generate_market_dataset(str(tmp_path / "two"), seed=3, workers=2, **kwargs)
  files_one, files_two = _files(one), _files(two)
  assert len(files_one) > 40
  assert files_one == files_two
  with pytest.raises(ValueError, match="workers"):
    generate_market_dataset(str(tmp_path / "three"), workers=0, **kwargs)


def test_idempotent_and_regenerates_on_other_parameters(tmp_path):
  kwargs = dict(_SMALL, num_train_ids=2, num_test_ids=2)
  folder = generate_market_dataset(str(tmp_path), seed=0, **kwargs)
  marker = os.path.join(folder, ".synthetic.json")
  with open(marker) as f:
    assert json.load(f)["seed"] == 0
  probe = os.path.join(folder, "query", "probe.txt")
  with open(probe, "w") as f:
    f.write("left alone when parameters match")
  assert generate_market_dataset(str(tmp_path), seed=0, **kwargs) == folder
  assert os.path.exists(probe)

  assert generate_market_dataset(str(tmp_path), seed=1, **kwargs) == folder
  assert not os.path.exists(probe)
  with open(marker) as f:
    assert json.load(f)["seed"] == 1
  assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".")] == []  # no temp folders


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
  real = tmp_path / "Market-1501-v15.09.15" / "query"
  real.mkdir(parents=True)
  (real / "0001_c1s1_000001_01.jpg").write_bytes(b"not ours")
  with pytest.raises(FileExistsError, match="marker"):
    generate_market_dataset(str(tmp_path), num_train_ids=2, num_test_ids=2)
  assert (real / "0001_c1s1_000001_01.jpg").read_bytes() == b"not ours"


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError):
    generate_market_dataset(str(tmp_path), num_cams=7)
  with pytest.raises(ValueError):
    generate_market_dataset(str(tmp_path), images_per_cam=(1, 3))
