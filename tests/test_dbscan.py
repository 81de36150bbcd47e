"""DBSCAN pseudo labels on precomputed distances, and the centroid / label helpers."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from ccreid_jax.clustering import (
  cluster_centroids,
  cluster_stats,
  dbscan_labels,
  relabel_consecutive,
)


def _graph():
  """8 points in the jaccard_distance convention (explicit zero diagonal, absent = 1.0).

  {0, 1, 2, 3}: all pairs at 0.25.  4: only linked to 3, at exactly 0.5.
  {5, 6}: one pair at 0.125.  7: linked to nothing.
  """
  pairs = [(i, j, 0.25) for i in range(4) for j in range(i + 1, 4)]
  pairs += [(3, 4, 0.5), (5, 6, 0.125)]
  rows = [i for i, j, _ in pairs] + [j for i, j, _ in pairs] + list(range(8))
  cols = [j for i, j, _ in pairs] + [i for i, j, _ in pairs] + list(range(8))
  vals = [d for *_, d in pairs] * 2 + [0.0] * 8
  sparse = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(8, 8))
  dense = np.ones((8, 8), dtype=np.float32)
  dense[rows, cols] = vals
  return sparse, dense


@pytest.mark.parametrize(
  "eps, min_samples, expected",
  [
    # 0-3 each see 4 points (self included): core. 4 sees {3, 4}: border of cluster 0.
    (0.5, 4, [0, 0, 0, 0, 0, -1, -1, -1]),
    # eps is inclusive: just below 0.5, point 4 loses its only neighbour.
    (0.4999, 4, [0, 0, 0, 0, -1, -1, -1, -1]),
    # Only 3 sees 5 points (4 others + itself); 0, 1, 2 are borders reached from it.
    (0.5, 5, [0, 0, 0, 0, 0, -1, -1, -1]),
    (0.5, 6, [-1] * 8),
    # The point itself counts: a pair is a cluster at min_samples 2, a lone point at 1.
    (0.5, 2, [0, 0, 0, 0, 0, 1, 1, -1]),
    (0.5, 1, [0, 0, 0, 0, 0, 1, 1, 2]),
    # 0.125 <= eps < 0.25: only the pair {5, 6} is linked.
    (0.2, 2, [-1, -1, -1, -1, -1, 0, 0, -1]),
  ],
)
def test_hand_built_graph(eps, min_samples, expected):
  sparse, dense = _graph()
  for dist in (sparse, dense):
    labels = dbscan_labels(dist, eps=eps, min_samples=min_samples)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_input_not_modified_and_explicit_zero_diagonal_kept():
  sparse, _ = _graph()
  before = sparse.copy()
  dbscan_labels(sparse, eps=0.5, min_samples=4)
  assert sparse.nnz == before.nnz and (sparse != before).nnz == 0


def test_stored_diagonal_one_is_not_a_neighbour():
  # A stored diagonal of 1.0 (an empty Jaccard support) means the point is not even its own
  # neighbour, as in the dense matrix; an absent diagonal follows scikit-learn (self counts).
  sparse, dense = _graph()
  sparse = sparse.tolil()
  sparse[7, 7] = 1.0
  dense[7, 7] = 1.0
  np.testing.assert_array_equal(dbscan_labels(sparse.tocsr(), 0.5, 1), dbscan_labels(dense, 0.5, 1))
  np.testing.assert_array_equal(dbscan_labels(dense, 0.5, 1), [0, 0, 0, 0, 0, 1, 1, -1])


def test_eps_at_least_one_rejected_for_sparse_only():
  sparse, dense = _graph()
  with pytest.raises(ValueError, match="absent"):
    dbscan_labels(sparse, eps=1.0)
  # Dense: every pair is within 1.0, so everything is one cluster.
  np.testing.assert_array_equal(dbscan_labels(dense, eps=1.0, min_samples=4), [0] * 8)
  with pytest.raises(ValueError):
    dbscan_labels(dense, eps=0.0)
  with pytest.raises(ValueError):
    dbscan_labels(np.zeros((3, 4)), eps=0.5)


def test_cluster_centroids():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  labels = rng.integers(-1, 4, 20)
  labels[:4] = [0, 1, 2, 3]  # every cluster used
  got = cluster_centroids(x, labels)
  assert got.shape == (4, 6) and got.dtype == np.float32
  for c in range(4):
    mean = x[labels == c].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  assert cluster_centroids(x, np.full(20, -1)).shape == (0, 6)
  with pytest.raises(ValueError, match="relabel"):
    cluster_centroids(x, np.where(labels == 1, 5, labels))


def test_relabel_consecutive_and_stats():
  labels = np.array([7, 7, -1, 3, 9, 3, -2, 7])
  np.testing.assert_array_equal(relabel_consecutive(labels), [0, 0, -1, 1, 2, 1, -1, 0])
  np.testing.assert_array_equal(relabel_consecutive([-1, -1]), [-1, -1])
  stats = cluster_stats(relabel_consecutive(labels))
  assert stats["num_clusters"] == 3
  assert stats["num_outliers"] == 2
  assert stats["num_samples"] == 8 and stats["num_clustered"] == 6
  assert stats["largest_cluster"] == 3 and stats["smallest_cluster"] == 1
  assert stats["num_singletons"] == 1
  assert stats["outlier_fraction"] == pytest.approx(0.25)


def _pair(value) -> tuple[np.ndarray, sp.csr_matrix]:
  """Two points at distance ``value``: dense float32 and sparse (explicit zero diagonal)."""
  dense = np.array([[0.0, value], [value, 0.0]], dtype=np.float32)
  sparse = sp.csr_matrix(
    (np.array([0.0, value, value, 0.0], np.float32), ([0, 0, 1, 1], [0, 1, 0, 1])), shape=(2, 2)
  )
  return dense, sparse


@pytest.mark.parametrize("steps", [-1, 0, 1])
@pytest.mark.parametrize("eps", [0.6, np.float64(0.6), 0.4])
def test_eps_boundary_is_decided_in_float32(eps, steps):
  # A float32 distance is compared with eps rounded to float32: float32(0.6) = 0.6000000238
  # is within eps = 0.6 although it exceeds 0.6 as a real number; the next float32 above it
  # (0.6000000834) is not. Dense and sparse inputs agree, and both agree with scikit-learn's
  # DBSCAN called directly on the dense float32 matrix with a Python float eps (the
  # reference's call). A NumPy float64 eps is treated as the Python float.
  value = np.float32(eps)
  for _ in range(abs(steps)):
    value = np.nextafter(value, np.float32(np.inf if steps > 0 else -np.inf))
  if steps == 0:
    assert float(value) > float(eps)  # above eps in exact arithmetic, yet a neighbour
  neighbours = bool(value <= np.float32(eps))  # the rule: d <= float32(eps)
  assert neighbours == (steps <= 0)
  dense, sparse = _pair(value)
  want = [0, 0] if neighbours else [-1, -1]
  np.testing.assert_array_equal(dbscan_labels(dense, eps=eps, min_samples=2), want)
  np.testing.assert_array_equal(dbscan_labels(sparse, eps=eps, min_samples=2), want)
  reference = DBSCAN(eps=float(eps), min_samples=2, metric="precomputed").fit_predict(dense)
  np.testing.assert_array_equal(reference, want)


def test_float64_dense_distance_is_compared_in_float64():
  # The comparison happens in the matrix's dtype: the same value 0.6000000238 held in a
  # float64 matrix is outside eps = 0.6.
  dense, _ = _pair(np.float32(0.6))
  np.testing.assert_array_equal(dbscan_labels(dense.astype(np.float64), 0.6, 2), [-1, -1])
  np.testing.assert_array_equal(dbscan_labels(dense, 0.6, 2), [0, 0])
