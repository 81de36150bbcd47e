"""k-reciprocal Jaccard distance: sparse implementation against the brute-force transcription.

Features are rounded to multiples of 2**-10 so that every dot product, and hence every
distance, is exact in float32 whatever the summation order: BLAS blocking cannot perturb the
kNN order, ties are genuine, and both implementations see the same numbers.
"""

import functools

import numpy as np
import pytest
import scipy.sparse as sp

from ccreid_jax.clustering import dbscan_labels, jaccard_distance, knn

import reference_impls as ref


def _quantise(x):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return (np.round(x * 1024) / 1024).astype(np.float32)


def _clustered(n, dim, clusters, spread, dup_fraction, seed):
  """Gaussian clusters on the sphere; a fraction of rows are exact copies of other rows."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = rng.integers(0, clusters, n)
  x = centres[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
  num_dup = int(dup_fraction * n)
  dst = rng.choice(n, num_dup, replace=False)
  x[dst] = x[rng.integers(0, n, num_dup)]
  return _quantise(x)


def _signs(n, dim, seed):
  """Vectors in {+-1/sqrt(dim)}^dim (exact for dim 16, 64): few distinct distances, many ties."""
  rng = np.random.default_rng(seed)
  return (rng.choice([-1.0, 1.0], size=(n, dim)) / np.sqrt(dim)).astype(np.float32)


def _duplicate_groups(seed):
  """A group of 40 identical points (more than k1 = 30) next to ordinary clusters."""
  rng = np.random.default_rng(seed)
  base = _clustered(120, 16, 6, 0.4, 0.0, seed)
  group = np.repeat(base[:1], 40, axis=0)
  x = np.concatenate([group, base[1:]])
  return x[rng.permutation(len(x))]


# name: (features factory, k1, k2, knn block size)
CASES = {
  "spread0.5_k30_6": (lambda: _clustered(300, 32, 15, 0.5, 0.1, 0), 30, 6, 64),
  "tight_k20_1": (lambda: _clustered(200, 16, 10, 0.25, 0.1, 1), 20, 1, 4096),
  "loose_k10_3": (lambda: _clustered(160, 64, 8, 0.9, 0.1, 2), 10, 3, 7),
  "signs16_k10_3": (lambda: _signs(150, 16, 3), 10, 3, 33),
  "signs64_k30_6": (lambda: _signs(120, 64, 4), 30, 6, 4096),
  "dupgroups_k30_1": (lambda: _duplicate_groups(5), 30, 1, 50),
  "dupgroups_k30_6": (lambda: _duplicate_groups(5), 30, 6, 4096),
  "odd_k5_2": (lambda: _clustered(90, 16, 6, 0.5, 0.1, 6), 5, 2, 4096),
  "odd_k7_6": (lambda: _clustered(90, 16, 6, 0.5, 0.1, 7), 7, 6, 4096),
  "n_below_k1": (lambda: _clustered(12, 8, 2, 0.5, 0.2, 8), 30, 6, 5),
}


@functools.cache
def _case(name):
  make, k1, k2, block = CASES[name]
  x = make()
  sparse = jaccard_distance(x, k1, k2, block_size=block)
  dense_ref = ref.jaccard_dense(x, k1, k2)
  return x, sparse, dense_ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_bruteforce(name):
  _, sparse, dense_ref = _case(name)
  np.testing.assert_allclose(ref.densify(sparse), dense_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_storage_convention(name):
  x, sparse, dense_ref = _case(name)
  n = x.shape[0]
  assert isinstance(sparse, sp.csr_matrix)
  assert sparse.dtype == np.float32 and sparse.shape == (n, n)
  assert sparse.has_sorted_indices
  rows = np.repeat(np.arange(n), np.diff(sparse.indptr))
  cols = sparse.indices
  # Canonical: no duplicate (row, col).
  assert np.unique(rows * n + cols).size == sparse.nnz
  # The diagonal is stored explicitly, exactly once per row, zeros included.
  assert np.array_equal(np.sort(rows[rows == cols]), np.arange(n))
  # Stored off-diagonal entries are exactly the pairs the reference puts below 1.
  off = rows != cols
  expected = dense_ref < 1.0
  np.fill_diagonal(expected, False)
  got = np.zeros((n, n), dtype=bool)
  got[rows[off], cols[off]] = True
  assert np.array_equal(got, expected)
  assert np.all(sparse.data[off] < 1.0) and np.all(sparse.data >= 0.0)
  # Symmetric.
  assert abs(sparse - sparse.T).max() == 0


def test_cases_exercise_ties_and_duplicates():
  x, _, _ = _case("spread0.5_k30_6")
  assert np.unique(x, axis=0).shape[0] < x.shape[0]  # exact duplicates present
  _, dist = knn(_case("signs16_k10_3")[0], 10)
  assert np.any(dist[:, 1:] == dist[:, :-1])  # tied neighbours inside the lists
  # A point with an empty V row (k2 = 1, 40 duplicates, k1 = 30) keeps its diagonal, at 1.0.
  _, sparse, dense_ref = _case("dupgroups_k30_1")
  lonely = np.diag(dense_ref) == 1.0
  assert 0 < lonely.sum() < 40
  np.testing.assert_array_equal(sparse.diagonal() == 1.0, lonely)
  np.testing.assert_allclose(sparse.diagonal(), np.diag(dense_ref), atol=1e-5)
  # Query expansion borrows non-empty rows from the neighbours: every diagonal is ~0 again.
  _, sparse_qe, _ = _case("dupgroups_k30_6")
  assert np.all(sparse_qe.diagonal() < 1e-5)
  # Explicit zeros survive (a diagonal 0.0 is stored, not dropped).
  _, sparse, _ = _case("spread0.5_k30_6")
  rows = np.repeat(np.arange(sparse.shape[0]), np.diff(sparse.indptr))
  assert np.any((sparse.data == 0.0) & (rows == sparse.indices))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("eps", [0.4, 0.6])
def test_dbscan_labels_sparse_equal_dense(name, eps):
  _, sparse, dense_ref = _case(name)
  got = dbscan_labels(sparse, eps=eps, min_samples=4)
  want = dbscan_labels(dense_ref, eps=eps, min_samples=4)
  np.testing.assert_array_equal(got, want)


def test_dbscan_on_clustered_features_finds_clusters():
  _, sparse, _ = _case("spread0.5_k30_6")
  labels = dbscan_labels(sparse, eps=0.6, min_samples=4)
  assert labels.max() + 1 >= 5


@pytest.mark.parametrize("name", ["signs16_k10_3", "spread0.5_k30_6", "dupgroups_k30_1"])
@pytest.mark.parametrize("block", [1, 7, 4096])
def test_knn_matches_stable_argsort(name, block):
  x = _case(name)[0]
  k = min(12, x.shape[0])
  want_idx, dense = ref.knn_lists(x, k)
  idx, dist = knn(x, k, block_size=block)
  assert idx.dtype == np.int64 and dist.dtype == np.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(dist, np.take_along_axis(dense, want_idx, axis=1))


def test_knn_tie_break_by_index():
  # Rows 0, 2, 3 are identical; rows 1 and 4 are identical and farther away from them.
  a = np.array([1.0, 0.0], dtype=np.float32)
  b = np.array([0.0, 1.0], dtype=np.float32)
  x = np.stack([a, b, a, a, b])
  idx, dist = knn(x, 5, block_size=2)
  np.testing.assert_array_equal(idx[3], [0, 2, 3, 1, 4])
  np.testing.assert_array_equal(idx[4], [1, 4, 0, 2, 3])
  np.testing.assert_array_equal(dist[3], [0, 0, 0, 2, 2])
  idx3, _ = knn(x, 2)
  np.testing.assert_array_equal(idx3, [[0, 2], [1, 4], [0, 2], [0, 2], [1, 4]])


def test_two_isolated_pairs_by_hand():
  # Exactly unit vectors: {0, 1} at distance 1, {2, 3} at distance 1, the pairs 3 or 4 apart.
  # With k1 = 2 every list is [self, partner], all reciprocal; V[i] = softmax([-0, -1]) over
  # {self, partner}, so the partner gets w = e^-1 / (1 + e^-1) and m = 2 min(w, 1 - w) = 2w.
  x = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, -0.5]],
    dtype=np.float32,
  )
  w = np.exp(-1.0) / (1.0 + np.exp(-1.0))
  expected = 1.0 - 2 * w / (2.0 - 2 * w)
  got = jaccard_distance(x, k1=2, k2=1)
  want = np.array(
    [[0, expected, 1, 1], [expected, 0, 1, 1], [1, 1, 0, expected], [1, 1, expected, 0]]
  )
  np.testing.assert_allclose(ref.densify(got), want, atol=1e-6)
  assert got.nnz == 8  # 4 diagonal zeros + 2 symmetric pairs; the rest is absent (= 1)
  # k2 = 2 averages V over [self, partner]: both rows become (1/2, 1/2) -> distance 0.
  np.testing.assert_allclose(
    jaccard_distance(x, k1=2, k2=2).toarray()[[0, 2], [1, 3]], 0.0, atol=1e-6
  )


def test_invalid_arguments():
  x = _signs(10, 16, 0)
  with pytest.raises(ValueError):
    jaccard_distance(x, k1=0)
  with pytest.raises(ValueError):
    jaccard_distance(np.zeros((0, 4), dtype=np.float32))
  with pytest.raises(ValueError):
    knn(x, 11)
  bad = x.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError):
    jaccard_distance(bad)


def _threshold(mat, limit):
  """Entries of a full-mode result with float32 value <= float32(limit), plus the diagonal."""
  coo = mat.tocoo()
  keep = (coo.data <= np.float32(limit)) | (coo.row == coo.col)
  return coo.row[keep], coo.col[keep], coo.data[keep]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("eps", [0.4, 0.6])
def test_max_distance_equals_thresholded_full(name, eps):
  x, sparse, dense_ref = _case(name)
  _, k1, k2, block = CASES[name]
  cut = jaccard_distance(x, k1, k2, max_distance=eps, block_size=block)
  n = x.shape[0]
  assert isinstance(cut, sp.csr_matrix) and cut.dtype == np.float32
  assert cut.has_sorted_indices and cut.shape == (n, n)
  coo = cut.tocoo()
  rows, cols, data = _threshold(sparse, eps)
  np.testing.assert_array_equal(coo.row, rows)  # same entries, same canonical order
  np.testing.assert_array_equal(coo.col, cols)
  np.testing.assert_array_equal(coo.data, data)  # bitwise equal values
  assert abs(cut - cut.T).max() == 0
  got = dbscan_labels(cut, eps=eps, min_samples=4)
  np.testing.assert_array_equal(got, dbscan_labels(sparse, eps=eps, min_samples=4))
  np.testing.assert_array_equal(got, dbscan_labels(dense_ref, eps=eps, min_samples=4))


def test_max_distance_keeps_float32_boundary_and_large_values():
  x, sparse, _ = _case("signs16_k10_3")
  _, k1, k2, _ = CASES["signs16_k10_3"]
  off = sparse.data[sparse.indices != np.repeat(np.arange(x.shape[0]), np.diff(sparse.indptr))]
  value = float(np.sort(off)[off.size // 2])  # an actual stored float32 distance
  cut = jaccard_distance(x, k1, k2, max_distance=value)
  assert np.any(cut.data == np.float32(value))  # the boundary is inclusive
  # Anything >= 1 stores exactly what the full mode stores.
  big = jaccard_distance(x, k1, k2, max_distance=5.0)
  assert (big != sparse).nnz == 0 and big.nnz == sparse.nnz
  with pytest.raises(ValueError):
    jaccard_distance(x, k1, k2, max_distance=-0.1)


@pytest.mark.parametrize("name", ["spread0.5_k30_6", "dupgroups_k30_1", "signs16_k10_3"])
def test_many_small_blocks_give_identical_results(name, monkeypatch):
  from ccreid_jax.clustering import jaccard as jaccard_module

  x, sparse, _ = _case(name)
  _, k1, k2, _ = CASES[name]
  cut = jaccard_distance(x, k1, k2, max_distance=0.6)
  monkeypatch.setattr(jaccard_module, "_PAIR_BUDGET", 700)
  monkeypatch.setattr(jaccard_module, "_HALF_BUFFER", 1)
  monkeypatch.setattr(jaccard_module, "_HALF_MIN_ROWS", 3)
  monkeypatch.setattr(jaccard_module, "_GATHER_BUDGET", 50)
  small = jaccard_distance(x, k1, k2, block_size=13)
  small_cut = jaccard_distance(x, k1, k2, max_distance=0.6, block_size=13)
  for got, want in ((small, sparse), (small_cut, cut)):
    assert got.nnz == want.nnz
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)


@pytest.mark.parametrize("n, block", [(37, 8), (64, 64), (100, 1024)])
def test_jax_knn_equals_stable_argsort_with_heavy_ties(n, block):
  # Few distinct points, many exact copies: every row has long runs of equal distances, and
  # the k-th entry falls inside such a run.
  rng = np.random.default_rng(n)
  base = _signs(5, 16, n)
  x = base[rng.integers(0, 5, n)]
  for k in (1, 7, n):
    want_idx, dense = ref.knn_lists(x, k)
    idx, dist = knn(x, k, block_size=block)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, np.take_along_axis(dense, want_idx, axis=1))
    assert not np.any(np.signbit(dist))  # self distance is +0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_knn_is_reranked_in_float32(dtype):
  x = _case("spread0.5_k30_6")[0]
  idx, dist = knn(x, 10, block_size=64, knn_dtype=dtype)
  exact_idx, _ = knn(x, 10, block_size=64)
  _, dense = ref.knn_lists(x, 10)
  # Distances are the float32 ones of the returned pairs, sorted by (distance, index).
  np.testing.assert_array_equal(dist, np.take_along_axis(dense, idx, axis=1))
  assert np.all(
    (dist[:, 1:] > dist[:, :-1]) | ((dist[:, 1:] == dist[:, :-1]) & (idx[:, 1:] > idx[:, :-1]))
  )
  assert np.mean(np.all(idx == exact_idx, axis=1)) > 0.9  # nearly always the exact list
  with pytest.raises(ValueError):
    knn(x, 10, knn_dtype="int8")


def test_knn_has_no_implicit_transfers():
  import jax

  x = _case("odd_k5_2")[0]
  want = knn(x, 5, block_size=16)
  with jax.transfer_guard("disallow"):
    got = knn(x, 5, block_size=16)
  np.testing.assert_array_equal(got[0], want[0])
