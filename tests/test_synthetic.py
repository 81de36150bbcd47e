"""The synthetic demo dataset: layout, file names, id structure, determinism, idempotence,
and the camera shift."""

import collections
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from ccreid_jax.data import synthetic
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


# --------------------------------------------------------------------------------------------
# camera_shift
# --------------------------------------------------------------------------------------------

# SHA-256 over the names and pre-JPEG pixels of every file of
# generate_market_dataset(seed=11, **_SMALL), as written before camera_shift existed. The
# pixels, not the JPEG files, so that another Pillow / libjpeg build does not change it.
_UNSHIFTED_PIXELS_SHA256 = "1f15cb89b3f0f4d01e681681e6fe320f21f3aa9138b8165eedf312a0aea36903"
_SHIFT_SET = dict(num_train_ids=12, num_test_ids=4, num_cams=4, images_per_cam=(3, 3),
                  height=32, width=16, seed=0)


def _digest(folder: str) -> str:
  digest = hashlib.sha256()
  for name, data in sorted(_files(folder).items()):
    digest.update(name.encode() + b"\0" + data)
  return digest.hexdigest()


def test_camera_shift_zero_writes_the_unshifted_bytes(tmp_path, monkeypatch):
  default = generate_market_dataset(str(tmp_path / "default"), seed=11, **_SMALL)
  zero = generate_market_dataset(str(tmp_path / "zero"), seed=11, camera_shift=0.0, **_SMALL)
  assert _files(default) == _files(zero)
  assert "camera_shift" not in _marker(zero)  # existing unshifted datasets stay valid
  monkeypatch.setattr(synthetic, "_jpeg_bytes", lambda array: array.tobytes())
  raw = generate_market_dataset(str(tmp_path / "raw"), seed=11, camera_shift=0.0, **_SMALL)
  assert _digest(raw) == _UNSHIFTED_PIXELS_SHA256


@pytest.fixture(scope="module")
def shift_sets(tmp_path_factory) -> dict[float, list]:
  """camera_shift -> the parsed records (train, then query and gallery) of ``_SHIFT_SET``."""
  out = {}
  for shift in (0.0, 1.0):
    root = str(tmp_path_factory.mktemp(f"shift{shift:g}"))
    generate_market_dataset(root, camera_shift=shift, **_SHIFT_SET)
    ds = load_dataset("market1501", root)
    out[shift] = (ds.train, ds.query + ds.gallery)
  return out


def _pixels(records) -> np.ndarray:
  return np.stack([np.asarray(Image.open(r.path), np.float32) for r in records])


def _cluster_aris(records) -> tuple[float, float]:
  """ARI of Ward clusters (as many as identities) of 8x4 thumbnails vs (ids, cameras)."""
  images = _pixels(records)
  n = len(images)
  thumbs = images.reshape(n, 8, 4, 4, 4, 3).mean((2, 4)).reshape(n, -1)
  thumbs = (thumbs - thumbs.mean(0)) / (thumbs.std(0) + 1e-6)
  pids = np.array([r.pid for r in records])
  cams = np.array([r.camid for r in records])
  labels = AgglomerativeClustering(n_clusters=len(set(pids)), linkage="ward").fit_predict(thumbs)
  return adjusted_rand_score(pids, labels), adjusted_rand_score(cams, labels)


def test_camera_shift_makes_pixels_cluster_by_camera(shift_sets):
  id_ari0, cam_ari0 = _cluster_aris(shift_sets[0.0][0])
  id_ari1, cam_ari1 = _cluster_aris(shift_sets[1.0][0])
  # Unshifted, clusters of raw pixels follow the identities; shifted, the cameras.
  assert id_ari0 > cam_ari0 + 0.1, (id_ari0, cam_ari0)
  assert cam_ari1 > 2 * id_ari1 and cam_ari1 > cam_ari0 + 0.2, (id_ari1, cam_ari1, cam_ari0)


def _mean_colours(records) -> tuple[np.ndarray, np.ndarray]:
  return _pixels(records).mean((1, 2)), np.array([r.camid for r in records])


def test_camera_shift_is_consistent_within_a_camera_and_differs_between(shift_sets):
  spreads = {}
  for shift, (train, test) in shift_sets.items():
    colours, cams = _mean_colours(train)
    centroids = np.stack([colours[cams == c].mean(0) for c in range(4)])
    within = np.sqrt(np.mean(((colours - centroids[cams]) ** 2).sum(1)))
    between = min(np.linalg.norm(centroids[a] - centroids[b])
                  for a in range(4) for b in range(a + 1, 4))
    spreads[shift] = between / within
    # A camera's mean colour, learnt on the train ids, names the camera of the test ids'
    # images: the shift belongs to the camera, whoever is in the picture.
    test_colours, test_cams = _mean_colours(test)
    guess = np.argmin(((test_colours[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(guess == test_cams))
    if shift:
      assert accuracy >= 0.9, accuracy
    else:
      assert accuracy < 0.8, accuracy
  # Shifted: every two cameras' colours lie further apart than a camera's images spread.
  assert spreads[1.0] > 2.0 and spreads[0.0] < 1.0, spreads


def _marker(folder: str) -> dict:
  with open(os.path.join(folder, ".synthetic.json")) as f:
    return json.load(f)


def test_camera_shift_marker_cli_and_invalid_values(tmp_path):
  kwargs = dict(_SMALL, num_train_ids=2, num_test_ids=2)
  folder = generate_market_dataset(str(tmp_path), camera_shift=0.5, **kwargs)
  assert _marker(folder)["camera_shift"] == 0.5
  before = _files(folder)
  assert generate_market_dataset(str(tmp_path), camera_shift=0.5, **kwargs) == folder
  assert generate_market_dataset(str(tmp_path), **kwargs) == folder  # regenerated unshifted
  assert "camera_shift" not in _marker(folder)
  after = _files(folder)
  assert set(before) == set(after)  # same names (the draws of ids and cameras are shared) ...
  assert all(before[k] != after[k] for k in before if k.endswith(".jpg"))  # ... other pixels

  synthetic.main(["--root", str(tmp_path / "cli"), "--num-train-ids", "2", "--num-test-ids", "2",
                  "--num-cams", "3", "--images-per-cam", "2", "2", "--height", "32", "--width",
                  "16", "--camera-shift", "1.5"])
  params = _marker(str(tmp_path / "cli" / "Market-1501-v15.09.15"))
  assert params["camera_shift"] == 1.5 and params["num_cams"] == 3

  for bad in (-0.1, 2.5, float("nan")):
    with pytest.raises(ValueError, match="camera_shift must be in"):
      generate_market_dataset(str(tmp_path / "bad"), camera_shift=bad, **kwargs)
  assert not (tmp_path / "bad").exists()
