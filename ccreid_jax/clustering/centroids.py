"""Cluster centroids and label bookkeeping (host side, numpy)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["cluster_centroids", "cluster_stats", "relabel_consecutive"]


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
  """Maps the non-negative labels to 0..K-1 in order of first appearance; negatives -> -1.

  DBSCAN labels already are 0..K-1; this is for labels from elsewhere (e.g. a filtered set).
  """
  labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
  out = np.full(labels.shape, -1, dtype=np.int64)
  valid = labels >= 0
  if not valid.any():
    return out
  uniq, first, inverse = np.unique(labels[valid], return_index=True, return_inverse=True)
  # rank[u] = position of label uniq[u] when labels are ordered by first appearance
  rank = np.empty(uniq.size, dtype=np.int64)
  rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
  out[valid] = rank[inverse]
  return out


def cluster_centroids(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """L2-normalised mean feature of every cluster 0..K-1, K = max(labels) + 1; -1 excluded.

  The sums are accumulated in float64. Raises ValueError when a label in 0..K-1 has no
  member (use ``relabel_consecutive`` first) or when a mean is the zero vector.

  Returns:
    (K, D) float32; (0, D) when every label is -1.
  """
  x = np.asarray(features)
  labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
  if x.ndim != 2 or x.shape[0] != labels.shape[0]:
    raise ValueError(f"features {x.shape} and labels {labels.shape} must be (N, D) and (N,).")
  valid = labels >= 0
  num = int(labels.max()) + 1 if valid.any() else 0
  if num == 0:
    return np.zeros((0, x.shape[1]), dtype=np.float32)
  counts = np.bincount(labels[valid], minlength=num)
  if np.any(counts == 0):
    raise ValueError(
      f"labels 0..{num - 1} are not all used (e.g. {int(np.argmin(counts))} is empty); "
      "relabel them with relabel_consecutive first."
    )
  members = np.flatnonzero(valid)
  onehot = sp.csr_matrix(
    (np.ones(members.size), (labels[members], members)), shape=(num, x.shape[0])
  )
  sums = np.asarray(onehot @ x.astype(np.float64, copy=False))
  norms = np.linalg.norm(sums, axis=1, keepdims=True)  # the mean has the same direction
  if np.any(norms == 0):
    raise ValueError("a cluster mean is the zero vector and cannot be normalised.")
  return (sums / norms).astype(np.float32)


def cluster_stats(labels: np.ndarray) -> dict:
  """Plain-number summary of a labelling: counts and cluster sizes (-1 = outlier)."""
  labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
  clustered = labels[labels >= 0]
  sizes = np.bincount(clustered) if clustered.size else np.zeros(0, dtype=np.int64)
  sizes = sizes[sizes > 0]
  n = int(labels.size)
  return {
    "num_samples": n,
    "num_clusters": int(sizes.size),
    "num_outliers": int(n - clustered.size),
    "outlier_fraction": float((n - clustered.size) / n) if n else 0.0,
    "num_clustered": int(clustered.size),
    "largest_cluster": int(sizes.max()) if sizes.size else 0,
    "smallest_cluster": int(sizes.min()) if sizes.size else 0,
    "mean_cluster_size": float(sizes.mean()) if sizes.size else 0.0,
    "median_cluster_size": float(np.median(sizes)) if sizes.size else 0.0,
    "num_singletons": int(np.sum(sizes == 1)),
  }
