"""CA-Jaccard distance: sparse implementation against a dense transcription of the definition.

The transcription (``_ca_jaccard_dense``) follows the reference code (``chenyiyuu/CA-Jaccard``,
``caj/utils/caj_rerank.py``) step by step with dense N x N arrays: ranking lists from the
distance plus 999 on the pushed-back part, k-reciprocal sets by list membership, the union,
softmax weights, the mean over the appended intra and inter heads, the min-sum over an inverted
index. Features are rounded to multiples of 2**-10 so that every distance is exact in float32
(and ``d + 999`` in float64): both sides see the same numbers and the ties are genuine; a
stable argsort then orders equal distances by index, the documented tie-break.
"""

import functools

import numpy as np
import pytest
import scipy.sparse as sp

from ccreid_jax.clustering import ca_jaccard_distance, dbscan_labels

import reference_impls as ref


def _quantise(x):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return (np.round(x * 1024) / 1024).astype(np.float32)


def _camera_shifted(cameras, dim, clusters, shift, spread, dup_fraction, seed):
  """Identity clusters plus a strong per-camera offset; some rows exact copies of others."""
  rng = np.random.default_rng(seed)
  cameras = np.asarray(cameras)
  n = cameras.size
  centres = rng.normal(size=(clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  camera_dirs = rng.normal(size=(cameras.max() + 1, dim))
  camera_dirs /= np.linalg.norm(camera_dirs, axis=1, keepdims=True)
  labels = rng.integers(0, clusters, n)
  x = (
    centres[labels]
    + shift * camera_dirs[cameras]
    + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
  )
  num_dup = int(dup_fraction * n)
  x[rng.choice(n, num_dup, replace=False)] = x[rng.integers(0, n, num_dup)]
  return _quantise(x)


def _random_cameras(n, num, seed):
  return np.random.default_rng(seed).integers(0, num, n)


def _signs(n, dim, seed):
  """Vectors in {+-1/sqrt(dim)}^dim: few distinct distances, many ties."""
  rng = np.random.default_rng(seed)
  return (rng.choice([-1.0, 1.0], size=(n, dim)) / np.sqrt(dim)).astype(np.float32)


def _shift6():
  cameras = _random_cameras(240, 6, 0)
  return _camera_shifted(cameras, 32, 12, 0.8, 0.5, 0.1, 0), cameras


def _small_cameras():
  # Camera 0: 100 images, hence only 20 < k1_inter + 1 other-camera images; camera 3: 1 image;
  # camera 2: 2 images (< k1_intra + 1).
  cameras = np.random.default_rng(1).permutation(np.repeat([0, 1, 2, 3], [100, 17, 2, 1]))
  return _camera_shifted(cameras, 16, 8, 0.6, 0.5, 0.05, 1), cameras


def _ties():
  cameras = _random_cameras(150, 4, 2)
  return _signs(150, 16, 2), cameras


def _one_camera():
  cameras = np.full(100, 7)
  return _camera_shifted(cameras, 16, 6, 0.0, 0.5, 0.1, 3), cameras


def _tiny():
  cameras = np.array([0, 0, 1, 2, 1, 0, 2, 0, 1, 0, 0, 1])
  return _camera_shifted(cameras, 8, 2, 0.5, 0.5, 0.2, 4), cameras


def _long_k2():
  cameras = np.random.default_rng(5).permutation(np.repeat([3, 9, 4, 1, 0], [30, 25, 20, 12, 3]))
  return _camera_shifted(cameras, 16, 6, 0.7, 0.5, 0.1, 5), cameras


DEFAULT = {"k1_intra": 5, "k1_inter": 20, "k2_intra": 2, "k2_inter": 4}
WARMUP = dict(DEFAULT, k2_intra=3, k2_inter=3)
# name: (features and cameras factory, k's, knn block size)
CASES = {
  "shift6": (_shift6, DEFAULT, 64),
  "shift6_warmup": (_shift6, WARMUP, 4096),
  "ties": (_ties, {"k1_intra": 5, "k1_inter": 10, "k2_intra": 2, "k2_inter": 4}, 33),
  "small_cameras": (_small_cameras, DEFAULT, 50),
  "one_camera": (_one_camera, DEFAULT, 7),
  "tiny_n": (_tiny, DEFAULT, 5),
  "long_k2": (_long_k2, {"k1_intra": 2, "k1_inter": 3, "k2_intra": 5, "k2_inter": 6}, 4096),
}


def _ca_jaccard_dense(x, cameras, k1_intra, k1_inter, k2_intra, k2_inter):
  """Dense float32 CA-Jaccard distance, step by step as the reference computes it."""
  n = x.shape[0]
  dist = 2.0 - 2.0 * (x @ x.T)  # float32
  same = cameras[:, None] == cameras[None, :]
  intra_rank = np.argsort(dist + 999.0 * ~same, axis=1, kind="stable")
  inter_rank = np.argsort(dist + 999.0 * same, axis=1, kind="stable")
  v = np.zeros((n, n), dtype=np.float64)
  for i in range(n):
    cols = np.union1d(
      ref.k_reciprocal(intra_rank, i, k1_intra), ref.k_reciprocal(inter_rank, i, k1_inter)
    ).astype(np.int64)
    logits = -dist[i, cols].astype(np.float64)
    w = np.exp(logits - logits.max())
    v[i, cols] = w / w.sum()
  v_qe = np.zeros_like(v)
  for i in range(n):
    rows = np.append(intra_rank[i, :k2_intra], inter_rank[i, :k2_inter])  # repeats count
    v_qe[i] = v[rows].mean(axis=0)
  inverted = [np.flatnonzero(v_qe[:, k]) for k in range(n)]
  out = np.zeros((n, n), dtype=np.float32)
  for i in range(n):
    m = np.zeros(n, dtype=np.float64)
    for k in np.flatnonzero(v_qe[i]):
      m[inverted[k]] += np.minimum(v_qe[i, k], v_qe[inverted[k], k])
    out[i] = 1.0 - m / (2.0 - m)
  out[out < 0] = 0.0
  return out


@functools.cache
def _case(name):
  make, ks, block = CASES[name]
  x, cameras = make()
  full = ca_jaccard_distance(x, cameras, block_size=block, **ks)
  return x, cameras, full, _ca_jaccard_dense(x, cameras, **ks)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_transcription(name):
  _, _, full, dense = _case(name)
  np.testing.assert_allclose(ref.densify(full), dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_storage_convention(name):
  x, _, full, dense = _case(name)
  n = x.shape[0]
  assert isinstance(full, sp.csr_matrix) and full.dtype == np.float32 and full.shape == (n, n)
  assert full.has_sorted_indices
  rows = np.repeat(np.arange(n), np.diff(full.indptr))
  assert np.unique(rows * n + full.indices).size == full.nnz  # no duplicates
  assert np.array_equal(np.sort(rows[rows == full.indices]), np.arange(n))  # diagonal stored
  off = rows != full.indices
  expected = dense < 1.0
  np.fill_diagonal(expected, False)
  got = np.zeros((n, n), dtype=bool)
  got[rows[off], full.indices[off]] = True
  assert np.array_equal(got, expected)  # exactly the pairs below 1 are stored
  assert abs(full - full.T).max() == 0


def test_cases_exercise_the_edge_cases():
  x, cameras, _, _ = _case("shift6")
  assert np.unique(x, axis=0).shape[0] < x.shape[0]  # exact duplicates
  # The camera shift matters: CA-Jaccard differs from what it would be without cameras.
  _, _, full, _ = _case("shift6")
  blind = ca_jaccard_distance(x, np.zeros_like(cameras))
  assert abs(full - blind).max() > 0.1
  x, _, _, _ = _case("ties")
  d = np.sort(2.0 - 2.0 * (x @ x.T), axis=1)[:, :12]
  assert np.any(d[:, 1:] == d[:, :-1])  # ties inside the list heads
  _, cameras, _, _ = _case("small_cameras")
  sizes = np.bincount(cameras)
  assert sizes.min() == 1 and np.any(sizes == 2)  # cameras below k1_intra + 1
  assert np.any(cameras.size - sizes < DEFAULT["k1_inter"] + 1)  # few other-camera images
  assert _case("tiny_n")[0].shape[0] < DEFAULT["k1_inter"] + 1


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("eps", [0.4, 0.6])
def test_max_distance_equals_thresholded_full(name, eps):
  x, cameras, full, dense = _case(name)
  _, ks, block = CASES[name]
  cut = ca_jaccard_distance(x, cameras, max_distance=eps, block_size=block, **ks)
  n = x.shape[0]
  assert isinstance(cut, sp.csr_matrix) and cut.dtype == np.float32 and cut.has_sorted_indices
  coo, full_coo = cut.tocoo(), full.tocoo()
  keep = (full_coo.data <= np.float32(eps)) | (full_coo.row == full_coo.col)
  np.testing.assert_array_equal(coo.row, full_coo.row[keep])
  np.testing.assert_array_equal(coo.col, full_coo.col[keep])
  np.testing.assert_array_equal(coo.data, full_coo.data[keep])  # bitwise equal values
  # Stored pairs agree with the dense transcription; absent pairs are beyond eps there.
  np.testing.assert_allclose(coo.data, dense[coo.row, coo.col], rtol=0, atol=1e-5)
  absent = np.ones((n, n), dtype=bool)
  absent[coo.row, coo.col] = False
  assert np.all(dense[absent] >= np.float32(eps) - 1e-5)
  got = dbscan_labels(cut, eps=eps, min_samples=4)
  np.testing.assert_array_equal(got, dbscan_labels(full, eps=eps, min_samples=4))
  np.testing.assert_array_equal(got, dbscan_labels(dense, eps=eps, min_samples=4))


def test_dbscan_finds_clusters_across_cameras():
  _, cameras, full, _ = _case("shift6")
  labels = dbscan_labels(full, eps=0.6, min_samples=4)
  assert labels.max() + 1 >= 3
  spans = [np.unique(cameras[labels == c]).size for c in range(labels.max() + 1)]
  assert max(spans) >= 2  # the camera-aware neighbours join images of different cameras


def test_camera_values_and_block_size_do_not_matter():
  x, cameras, full, _ = _case("small_cameras")
  relabelled = np.array([40, -3, 7, 1000])[cameras]  # any integers, only equality matters
  for other in (
    ca_jaccard_distance(x, relabelled, block_size=1),
    ca_jaccard_distance(x, cameras.astype(np.uint8), block_size=4096),
  ):
    np.testing.assert_array_equal(other.indptr, full.indptr)
    np.testing.assert_array_equal(other.indices, full.indices)
    np.testing.assert_array_equal(other.data, full.data)


def test_one_camera_uses_the_plain_list_twice():
  # One camera: intra and inter lists are both the plain kNN list, so Rk(i, k1_intra) lies
  # inside Rk(i, k1_inter) and k1_intra has no effect while k1_intra <= k1_inter.
  x, cameras, full, _ = _case("one_camera")
  _, ks, block = CASES["one_camera"]
  for k1_intra in (1, ks["k1_inter"]):
    other = ca_jaccard_distance(x, cameras, block_size=block, **dict(ks, k1_intra=k1_intra))
    np.testing.assert_array_equal(other.indices, full.indices)
    np.testing.assert_array_equal(other.data, full.data)
  # A second camera changes the lists, hence the distance.
  two = ca_jaccard_distance(x, np.arange(x.shape[0]) % 2, **ks)
  assert abs(full - two).max() > 0.01


def test_invalid_arguments():
  x = _signs(10, 16, 0)
  cameras = np.arange(10) % 3
  with pytest.raises(ValueError, match="cameras"):
    ca_jaccard_distance(x, cameras[:9])
  with pytest.raises(ValueError, match="cameras"):
    ca_jaccard_distance(x, cameras[:, None])
  with pytest.raises(ValueError, match="integer"):
    ca_jaccard_distance(x, cameras.astype(np.float32))
  for name in ("k1_intra", "k1_inter", "k2_intra", "k2_inter"):
    with pytest.raises(ValueError, match=name):
      ca_jaccard_distance(x, cameras, **{name: 0})
  with pytest.raises(ValueError, match="max_distance"):
    ca_jaccard_distance(x, cameras, max_distance=-0.1)
  bad = x.copy()
  bad[0, 0] = np.inf
  with pytest.raises(ValueError):
    ca_jaccard_distance(bad, cameras)
