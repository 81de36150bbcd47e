"""The synthetic demo dataset: layout, file names, identity structure, determinism, idempotence,
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

_SMALL = dict(
  num_train_identities=6,
  num_test_identities=5,
  num_cameras=4,
  images_per_camera=(2, 3),
  height=32,
  width=16,
)
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
    ".synthetic.json",
    "bounding_box_test",
    "bounding_box_train",
    "query",
  ]
  for split in ("bounding_box_train", "query", "bounding_box_test"):
    names = os.listdir(os.path.join(folder, split))
    assert names and all(_MARKET_NAME.match(n) for n in names), names
  # Every image is a 32x16 RGB JPEG.
  sample = os.path.join(folder, "query", sorted(os.listdir(os.path.join(folder, "query")))[0])
  with Image.open(sample) as image:
    assert image.format == "JPEG" and image.size == (16, 32) and image.mode == "RGB"
  # Unique names across the whole dataset.
  all_names = [
    n
    for s in ("bounding_box_train", "query", "bounding_box_test")
    for n in os.listdir(os.path.join(folder, s))
  ]
  assert len(all_names) == len(set(all_names))


def test_identity_structure(small):
  ds = load_dataset("market1501", small)
  train_identities = {r.identity for r in ds.train}
  query_identities = {r.identity for r in ds.query}
  gallery_identities = {r.identity for r in ds.gallery} - {0}
  assert train_identities == set(range(1, 7))
  assert query_identities == set(range(7, 12))
  assert query_identities <= gallery_identities and gallery_identities == query_identities
  assert not train_identities & (query_identities | gallery_identities)

  cameras_of = collections.defaultdict(set)
  per_camera = collections.Counter()
  for r in ds.train + ds.query + ds.gallery:
    if r.identity != 0:
      cameras_of[r.identity].add(r.camera)
      per_camera[r.identity, r.camera] += 1
  assert all(len(c) >= 2 for c in cameras_of.values())
  assert all(c <= {0, 1, 2, 3} for c in cameras_of.values())
  assert all(2 <= n <= 3 for n in per_camera.values())

  # Query: one image from each of one or two cameras of each test identity; each query has a
  # cross-camera match in the gallery.
  queries_per_identity = collections.Counter(r.identity for r in ds.query)
  assert all(1 <= n <= 2 for n in queries_per_identity.values())
  assert all(
    len({r.camera for r in ds.query if r.identity == identity}) == n
    for identity, n in queries_per_identity.items()
  )
  gallery_pairs = {(r.identity, r.camera) for r in ds.gallery}
  for q in ds.query:
    assert any(identity == q.identity and camera != q.camera for identity, camera in gallery_pairs)

  # Distractors (identity 0) kept in the gallery; junk (identity -1) on disk, dropped by the parser.
  assert sum(r.identity == 0 for r in ds.gallery) == max(1, 5 // 5)
  gallery_dir = os.path.join(small, "Market-1501-v15.09.15", "bounding_box_test")
  assert sum(n.startswith("-1_c") for n in os.listdir(gallery_dir)) == max(1, 5 // 10)


def test_identities_differ_and_images_vary(small):
  ds = load_dataset("market1501", small)

  def load(r):
    return np.asarray(Image.open(r.path), np.float32)

  a, b = [r for r in ds.train if r.identity == 1][:2]
  assert not np.array_equal(load(a), load(b))  # per-image nuisance
  means = {
    identity: np.mean([load(r).mean((0, 1)) for r in ds.train if r.identity == identity], axis=0)
    for identity in range(1, 7)
  }
  assert len({tuple(np.round(m)) for m in means.values()}) == 6


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  kwargs = dict(_SMALL, num_train_identities=3, num_test_identities=2)
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
  kwargs = dict(_SMALL, num_train_identities=5, num_test_identities=4)
  one = generate_market_dataset(str(tmp_path / "one"), seed=3, **kwargs)
  two = generate_market_dataset(str(tmp_path / "two"), seed=3, workers=2, **kwargs)
  files_one, files_two = _files(one), _files(two)
  assert len(files_one) > 40
  assert files_one == files_two
  with pytest.raises(ValueError, match="workers"):
    generate_market_dataset(str(tmp_path / "three"), workers=0, **kwargs)


def test_idempotent_and_regenerates_on_other_parameters(tmp_path):
  kwargs = dict(_SMALL, num_train_identities=2, num_test_identities=2)
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


def test_a_marker_with_the_old_keys_still_matches(tmp_path):
  kwargs = dict(_SMALL, num_train_identities=2, num_test_identities=2)
  folder = generate_market_dataset(str(tmp_path), **kwargs)
  marker = os.path.join(folder, ".synthetic.json")
  with open(marker) as f:
    params = json.load(f)
  old = {
    "num_train_identities": "num_train_ids",
    "num_test_identities": "num_test_ids",
    "num_cameras": "num_cams",
    "images_per_camera": "images_per_cam",
  }
  with open(marker, "w") as f:  # the marker as the generator wrote it before the rename
    json.dump({old.get(k, k): v for k, v in params.items()}, f)
  probe = os.path.join(folder, "query", "probe.txt")
  with open(probe, "w") as f:
    f.write("left alone: the old marker describes the same dataset")
  assert generate_market_dataset(str(tmp_path), **kwargs) == folder
  assert os.path.exists(probe)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
  real = tmp_path / "Market-1501-v15.09.15" / "query"
  real.mkdir(parents=True)
  (real / "0001_c1s1_000001_01.jpg").write_bytes(b"not ours")
  with pytest.raises(FileExistsError, match="marker"):
    generate_market_dataset(str(tmp_path), num_train_identities=2, num_test_identities=2)
  assert (real / "0001_c1s1_000001_01.jpg").read_bytes() == b"not ours"


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError):
    generate_market_dataset(str(tmp_path), num_cameras=7)
  with pytest.raises(ValueError):
    generate_market_dataset(str(tmp_path), images_per_camera=(1, 3))


# --------------------------------------------------------------------------------------------
# camera_shift
# --------------------------------------------------------------------------------------------

# SHA-256 over the names and pre-JPEG pixels of every image of
# generate_market_dataset(seed=11, **_SMALL), as written before camera_shift existed. The
# pixels, not the JPEG files, so that another Pillow / libjpeg build does not change it; the
# images only, not the .synthetic.json marker (whose keys were renamed since).
_UNSHIFTED_PIXELS_SHA256 = "aef4e9c5cac3e7f5febfb79f9f6169cd283220bd100f4c70c62abfebf76375db"
_SHIFT_SET = dict(
  num_train_identities=12,
  num_test_identities=4,
  num_cameras=4,
  images_per_camera=(3, 3),
  height=32,
  width=16,
  seed=0,
)


def _digest(folder: str) -> str:
  digest = hashlib.sha256()
  for name, data in sorted(_files(folder).items()):
    if name != ".synthetic.json":
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
  """ARI of Ward clusters (as many as identities) of 8x4 thumbnails vs (identities, cameras)."""
  images = _pixels(records)
  n = len(images)
  thumbs = images.reshape(n, 8, 4, 4, 4, 3).mean((2, 4)).reshape(n, -1)
  thumbs = (thumbs - thumbs.mean(0)) / (thumbs.std(0) + 1e-6)
  identities = np.array([r.identity for r in records])
  cameras = np.array([r.camera for r in records])
  labels = AgglomerativeClustering(n_clusters=len(set(identities)), linkage="ward").fit_predict(
    thumbs
  )
  return adjusted_rand_score(identities, labels), adjusted_rand_score(cameras, labels)


def test_camera_shift_makes_pixels_cluster_by_camera(shift_sets):
  identity_ari0, camera_ari0 = _cluster_aris(shift_sets[0.0][0])
  identity_ari1, camera_ari1 = _cluster_aris(shift_sets[1.0][0])
  # Unshifted, clusters of raw pixels follow the identities; shifted, the cameras.
  assert identity_ari0 > camera_ari0 + 0.1, (identity_ari0, camera_ari0)
  assert camera_ari1 > 2 * identity_ari1 and camera_ari1 > camera_ari0 + 0.2, (
    identity_ari1,
    camera_ari1,
    camera_ari0,
  )


def _mean_colours(records) -> tuple[np.ndarray, np.ndarray]:
  return _pixels(records).mean((1, 2)), np.array([r.camera for r in records])


def test_camera_shift_is_consistent_within_a_camera_and_differs_between(shift_sets):
  spreads = {}
  for shift, (train, test) in shift_sets.items():
    colours, cameras = _mean_colours(train)
    centroids = np.stack([colours[cameras == c].mean(0) for c in range(4)])
    within = np.sqrt(np.mean(((colours - centroids[cameras]) ** 2).sum(1)))
    between = min(
      np.linalg.norm(centroids[a] - centroids[b]) for a in range(4) for b in range(a + 1, 4)
    )
    spreads[shift] = between / within
    # A camera's mean colour, learnt on the train identities, names the camera of the test
    # identities' images: the shift belongs to the camera, whoever is in the picture.
    test_colours, test_cameras = _mean_colours(test)
    guess = np.argmin(((test_colours[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(guess == test_cameras))
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
  kwargs = dict(_SMALL, num_train_identities=2, num_test_identities=2)
  folder = generate_market_dataset(str(tmp_path), camera_shift=0.5, **kwargs)
  assert _marker(folder)["camera_shift"] == 0.5
  before = _files(folder)
  assert generate_market_dataset(str(tmp_path), camera_shift=0.5, **kwargs) == folder
  assert generate_market_dataset(str(tmp_path), **kwargs) == folder  # regenerated unshifted
  assert "camera_shift" not in _marker(folder)
  after = _files(folder)
  assert set(before) == set(after)  # same names (the identities' and cameras' draws are shared)...
  assert all(before[k] != after[k] for k in before if k.endswith(".jpg"))  # ... other pixels

  synthetic.main(
    [
      "--root",
      str(tmp_path / "cli"),
      "--num-train-identities",
      "2",
      "--num-test-identities",
      "2",
      "--num-cameras",
      "3",
      "--images-per-camera",
      "2",
      "2",
      "--height",
      "32",
      "--width",
      "16",
      "--camera-shift",
      "1.5",
    ]
  )
  params = _marker(str(tmp_path / "cli" / "Market-1501-v15.09.15"))
  assert params["camera_shift"] == 1.5 and params["num_cameras"] == 3

  for bad in (-0.1, 2.5, float("nan")):
    with pytest.raises(ValueError, match="camera_shift must be in"):
      generate_market_dataset(str(tmp_path / "bad"), camera_shift=bad, **kwargs)
  assert not (tmp_path / "bad").exists()
