"""DBSCAN pseudo labels from a precomputed distance (docs/algorithms.md, section 5).

``eps`` is inclusive (``d <= eps`` makes two points neighbours) and ``min_samples`` counts the
point itself; label -1 marks outliers. Clusters are numbered 0..K-1 by scikit-learn in the order
in which they are discovered (increasing index of their first core point).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

__all__ = ["dbscan_labels"]


def dbscan_labels(distance, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
  """DBSCAN over a precomputed N x N distance; returns int64 labels, -1 = outlier.

  Args:
    distance: a dense (N, N) array, or a scipy sparse matrix in the convention of
      ``jaccard_distance``: only stored entries are candidate neighbours and an absent entry
      means distance 1.0. Entries are compared with ``eps`` in the matrix's own dtype
      (scikit-learn tests ``d <= eps`` on the stored values and NumPy casts the Python float
      ``eps`` to the array's dtype), dense and sparse alike: for float32 distances a pair is
      within ``eps`` exactly when ``d <= float32(eps)``. A stored float32 0.6 (0.6000000238)
      is therefore within ``eps=0.6``; the next float32 above it (0.6000000834) is not. The
      reference compares its dense float32 matrix through the same scikit-learn call, with
      the same result, and ``jaccard_distance(..., max_distance=eps)`` stores exactly these
      pairs. A float64 matrix is compared in float64. A sparse matrix whose diagonal entry
      is absent makes that point its own neighbour (scikit-learn's rule);
      ``jaccard_distance`` always stores its diagonal, so the rule never applies to it.
    eps: neighbourhood radius, inclusive. Converted to a Python float first (NumPy 2 would
      compare float32 distances with a NumPy float64 scalar in float64). Must be < 1 for a
      sparse input: absent pairs are at distance 1.0 and would have to count as neighbours
      for ``eps >= 1``.
    min_samples: core-point threshold, the point itself included.

  Returns:
    (N,) int64 labels in -1..K-1.
  """
  eps = float(eps)
  if not eps > 0:
    raise ValueError(f"eps must be positive, got {eps}.")
  if int(min_samples) < 1:
    raise ValueError(f"min_samples must be >= 1, got {min_samples}.")
  if sp.issparse(distance):
    if eps >= 1.0:
      raise ValueError(
        f"eps={eps} >= 1 with a sparse distance: absent entries stand for distance 1.0, so "
        "every pair would be within eps but only stored pairs would be found. Use eps < 1 "
        "or pass the dense matrix."
      )
    matrix = sp.csr_matrix(distance)  # scikit-learn copies before its own edits
  else:
    matrix = np.asarray(distance)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"distance must be square (N, N), got shape {matrix.shape}.")
  if matrix.shape[0] == 0:
    return np.zeros(0, dtype=np.int64)
  model = DBSCAN(eps=eps, min_samples=int(min_samples), metric="precomputed")
  return model.fit_predict(matrix).astype(np.int64)
