"""InfoMap pseudo labels on a thresholded kNN graph (docs/algorithms.md, section 5, "InfoMap").

1. kNN by inner product, ``k`` entries per point, the point itself included (``knn`` of
   ``jaccard.py``: for unit features the order of ``2 - 2 x_i.x_j`` is the order of decreasing
   ``x_i.x_j``).
2. For each ``i``, walk its neighbours (skipping ``i`` itself) in order of decreasing cosine and
   add a directed edge ``i -> j`` with weight ``x_i.x_j`` while the cosine is
   ``>= min_similarity``; the walk stops at the first neighbour below it.
3. Two-level directed InfoMap (package ``infomap``) on those edges, with the package's default
   seed unless another is given (the reference calls InfoMap with its defaults).
4. Points without any edge (in or out) are singletons; every cluster with fewer than
   ``min_cluster_size`` members becomes -1 (outliers). The reference drops clusters of size
   <= 4, i.e. ``min_cluster_size=5``, the default.

Labels are consecutive 0..K-1, clusters numbered by their smallest member index.
"""

from __future__ import annotations

from typing import Any

import infomap
import numpy as np

from ccreid_jax.clustering.jaccard import check_features, knn, pair_dots

__all__ = ["infomap_edges", "infomap_labels"]


def infomap_edges(
  features: np.ndarray, k: int = 15, min_similarity: float = 0.5, *, block_size: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The directed, weighted kNN edges InfoMap clusters (steps 1-2 of the module docstring).

  Cosines are float32 dot products of the feature rows. Each row's ``k`` neighbours are
  re-ordered by decreasing cosine (ties keep the kNN order: distance, then index), so the walk
  follows the cosines it compares with ``min_similarity`` even where float32 rounding of the
  distance ``2 - 2 cos`` merged two distinct cosines.

  Args:
    features: (N, D) L2-normalised features.
    k: kNN list length, the point itself included (``k - 1`` possible edges per point); clipped
      to N.
    min_similarity: an edge needs a cosine ``>= min_similarity``.
    block_size: rows per kNN matmul block.

  Returns:
    ``(src, dst, weight)``: int64, int64 and float32 arrays, edges ordered by source and, per
    source, by decreasing weight.
  """
  x = check_features(features)
  n = x.shape[0]
  k = min(int(k), n)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  indices, _ = knn(x, k, block_size)
  rows = np.repeat(np.arange(n, dtype=np.int64), k)
  sims = pair_dots(x, rows, indices.ravel()).reshape(n, k)
  order = np.argsort(-sims, axis=1, kind="stable")
  indices = np.take_along_axis(indices, order, axis=1)
  sims = np.take_along_axis(sims, order, axis=1)
  is_self = indices == np.arange(n)[:, None]
  # The walk: self entries are skipped (pass through), the first failure ends the row.
  alive = np.logical_and.accumulate((sims >= np.float32(min_similarity)) | is_self, axis=1)
  take = alive & ~is_self
  return rows.reshape(n, k)[take], indices[take], sims[take]


def infomap_labels(
  features: np.ndarray,
  k: int = 15,
  min_similarity: float = 0.5,
  min_cluster_size: int = 5,
  *,
  seed: int | None = None,
  block_size: int = 1024,
) -> np.ndarray:
  """InfoMap pseudo labels (docs/algorithms.md, section 5); -1 marks outliers.

  Args:
    features: (N, D) L2-normalised features.
    k: kNN list length, the point itself included (the reference uses 15).
    min_similarity: smallest cosine of an edge (the reference uses 0.5).
    min_cluster_size: smallest cluster that is kept; smaller ones (singletons included) become
      -1. The reference drops clusters of size <= 4, i.e. ``min_cluster_size=5``.
    seed: InfoMap's random seed, >= 1; None uses the ``infomap`` package's default, as the
      reference does. Either way the labels are deterministic for given features.
    block_size: rows per kNN matmul block.

  Returns:
    (N,) int64 labels in -1..K-1; cluster c has the c-th smallest "smallest member index".
  """
  if int(min_cluster_size) < 1:
    raise ValueError(f"min_cluster_size must be >= 1, got {min_cluster_size}.")
  x = check_features(features)
  n = x.shape[0]
  src, dst, weight = infomap_edges(x, k, min_similarity, block_size=block_size)
  module = np.arange(n, dtype=np.int64) + n  # edgeless points: their own singleton modules
  if src.size:
    options: dict[str, Any] = {} if seed is None else {"seed": int(seed)}  # Infomap's kwargs
    solver = infomap.Infomap("--two-level --directed --silent", **options)
    solver.add_links(zip(src.tolist(), dst.tolist(), weight.astype(np.float64).tolist()))
    found = solver.run().modules()
    nodes = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
    module[nodes] = np.fromiter(found.values(), dtype=np.int64, count=len(found))
  _, first, inverse, counts = np.unique(
    module, return_index=True, return_inverse=True, return_counts=True
  )
  kept = counts >= int(min_cluster_size)
  # Consecutive ids for the kept modules, in order of their smallest member index.
  rank = np.full(first.size, -1, dtype=np.int64)
  kept_ids = np.flatnonzero(kept)
  rank[kept_ids[np.argsort(first[kept_ids], kind="stable")]] = np.arange(kept_ids.size)
  return rank[inverse]
