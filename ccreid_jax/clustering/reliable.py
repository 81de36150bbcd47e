"""SpCL's cluster-reliability criterion: DBSCAN at three radii, unreliable members split off.

docs/algorithms.md section 10 (the label generator of the official RLCC recipe). With the labels
of DBSCAN at a tight, a normal and a loose radius, outliers turned into singleton classes at each
radius, and ``N_x(i)`` the samples sharing sample i's label in clustering x:

* ``R_comp(i) = 1 - |N_normal(i) & N_tight(i)| / |N_normal(i) | N_tight(i)|``,
  ``R_indep(i)`` the same with the loose clustering. Both are computed in float32 (integer
  counts, one float32 division, one float32 subtraction), as the reference does.
* Per normal class c: ``comp_min(c)`` and ``indep_min(c)``, the minima over its members.
* The independence threshold: the ``indep_min`` of the classes with more than one member,
  sorted increasingly, taken at position ``min(n - 1, round(0.9 n))`` (numpy's round, half to
  even: n = 5 -> 4, n = 15 -> 14). It is computed when none is given; the caller keeps the value
  of its first call (the first epoch) and passes it to every later call.
* Sample i of class c fails when ``indep_min(c) > threshold`` or ``R_comp(i) > comp_min(c)``
  (both strict, compared in float64). Members are visited in index order and a failing member
  becomes a new singleton class while c still has more than one member: c never loses its last
  member, so when every member fails (possible through the threshold only), all but the
  highest-index member are split off. Singletons are never split.

Numbering (the reference's): the normal radius's DBSCAN clusters keep scikit-learn's labels
0..K-1, its outliers follow as K..K+O-1 in sample order, and split-off members get the next
labels in sample order.

Everything is O(N) memory besides DBSCAN itself: the scores come from label co-occurrence counts
(one ``np.unique`` over label pairs), never from N x N label-equality matrices.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse as sp

from ccreid_jax.clustering.dbscan import dbscan_labels
from ccreid_jax.clustering.rlcc import keep_outliers_as_singletons

__all__ = ["reliable_dbscan_labels"]

# The threshold sits at this fraction of the sorted per-class independence minima.
_INDEP_QUANTILE = 0.9


def _check_eps(eps) -> tuple[float, float, float]:
  try:
    values = tuple(float(e) for e in eps)
  except TypeError as error:
    raise ValueError(f"eps must be three radii (tight, normal, loose), got {eps!r}.") from error
  if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
    raise ValueError(
      f"eps must be three positive finite radii (tight, normal, loose), got {eps!r}."
    )
  if not values[0] < values[1] < values[2]:
    raise ValueError(
      f"eps must increase strictly (tight < normal < loose; config: cluster.eps_tight < "
      f"cluster.eps < cluster.eps_loose), got {values}."
    )
  return values


def _check_threshold(indep_threshold) -> float | None:
  if indep_threshold is None:
    return None
  if isinstance(indep_threshold, bool) or not isinstance(indep_threshold, numbers.Real):
    raise ValueError(f"indep_threshold must be None or a number, got {indep_threshold!r}.")
  value = float(indep_threshold)
  if math.isnan(value):
    raise ValueError(
      "indep_threshold is NaN; pass None to compute it or the value of the first epoch."
    )
  return value


def _num_samples(distance) -> int:
  shape = distance.shape if sp.issparse(distance) else np.shape(distance)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"distance must be square (N, N), got shape {tuple(shape)}.")
  return int(shape[0])


def _one_minus_iou(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
  """Per sample, float32 ``1 - IoU`` of its class in ``labels`` and its class in ``other``.

  Both labellings are 0..K-1 with no -1. The intersection size of sample i is the number of
  samples carrying the same (label, other label) pair as i.
  """
  sizes = np.bincount(labels)
  other_sizes = np.bincount(other)
  pairs = labels * np.int64(other_sizes.size) + other
  _, inverse, counts = np.unique(pairs, return_inverse=True, return_counts=True)
  inter = counts[inverse.ravel()]
  union = sizes[labels] + other_sizes[other] - inter
  return np.float32(1.0) - inter.astype(np.float32) / union.astype(np.float32)


def _class_minima(labels: np.ndarray, scores: np.ndarray, num: int) -> np.ndarray:
  minima = np.full(num, np.inf, dtype=scores.dtype)
  np.minimum.at(minima, labels, scores)
  return minima


def _independence_threshold(indep_min: np.ndarray, sizes: np.ndarray) -> float | None:
  """The sorted minima of the classes of 2+ at ``min(n - 1, round(0.9 n))``; None if n = 0."""
  candidates = np.sort(indep_min[sizes > 1].astype(np.float64))
  n = candidates.size
  if n == 0:
    return None
  return float(candidates[min(n - 1, int(np.round(n * _INDEP_QUANTILE)))])


def _split_members(normal: np.ndarray, fail: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Mask of the failing members split off, visiting samples in index order.

  A class never loses its last member: where every member fails, the highest-index member
  stays (the visit splits the others first); otherwise every failing member is split.
  """
  failures = np.bincount(normal[fail], minlength=sizes.size)
  last = np.zeros(sizes.size, dtype=np.int64)
  np.maximum.at(last, normal, np.arange(normal.size, dtype=np.int64))
  split = fail.copy()
  split[last[failures == sizes]] = False
  return split


def reliable_dbscan_labels(
  distance,
  eps=(0.58, 0.6, 0.62),
  min_samples: int = 4,
  *,
  outliers_as_singletons: bool = True,
  indep_threshold: float | None = None,
) -> tuple[np.ndarray, float | None]:
  """DBSCAN labels with SpCL's reliability criterion (docs/algorithms.md section 10).

  Args:
    distance: a dense (N, N) array, or a scipy sparse matrix in the convention of
      ``jaccard_distance`` (only stored entries are candidate neighbours, absent = 1.0; store at
      least every pair within the loose radius, e.g. ``max_distance=eps[2]``). Passed as is to
      ``dbscan_labels`` for each radius.
    eps: the three radii (tight, normal, loose), strictly increasing. The reference sorts
      whatever it is given; here an unsorted triple is an error.
    min_samples: DBSCAN's core-point threshold (the point itself included), at every radius.
    outliers_as_singletons: True (the official recipe): the normal radius's DBSCAN outliers are
      singleton classes K..K+O-1 in sample order, split-off members follow from K+O. False: the
      scores are computed exactly as with True (outliers are singletons at every radius, which
      affects no multi-member class), the DBSCAN outliers come back as -1, and split-off members
      still become new classes K, K+1, ... in sample order (they are not dropped: the reference
      also gives them new classes in that mode). The reference's own ``use_outliers=False`` path
      pools all outliers into one label in the scores and reads the per-class minima one class
      off; that is not reproduced.
    indep_threshold: the independence threshold to apply. None computes it from this
      clustering (the first epoch); pass the returned value on every later call. When no class
      has two or more members it cannot be computed: it then stays None (nothing can be split)
      and the next call tries again; the reference raises IndexError there.

  Returns:
    ``(labels, indep_threshold)``: (N,) int64 labels, consecutive 0..C-1 (plus -1 for outliers
    when ``outliers_as_singletons`` is False), numbered as the module docstring says; and the
    threshold used (the given one, the computed one, or None), a Python float.
  """
  tight_eps, normal_eps, loose_eps = _check_eps(eps)
  threshold = _check_threshold(indep_threshold)
  n = _num_samples(distance)
  if n == 0:
    return np.zeros(0, dtype=np.int64), threshold
  raw_normal = dbscan_labels(distance, eps=normal_eps, min_samples=min_samples)
  normal = keep_outliers_as_singletons(raw_normal)
  tight = keep_outliers_as_singletons(
    dbscan_labels(distance, eps=tight_eps, min_samples=min_samples)
  )
  loose = keep_outliers_as_singletons(
    dbscan_labels(distance, eps=loose_eps, min_samples=min_samples)
  )

  comp = _one_minus_iou(normal, tight)
  indep = _one_minus_iou(normal, loose)
  sizes = np.bincount(normal)
  comp_min = _class_minima(normal, comp, sizes.size)
  indep_min = _class_minima(normal, indep, sizes.size)
  if threshold is None:
    threshold = _independence_threshold(indep_min, sizes)
  if threshold is None:
    fail = np.zeros(n, dtype=bool)
  else:
    fail = (indep_min.astype(np.float64)[normal] > threshold) | (comp > comp_min[normal])
  split = _split_members(normal, fail, sizes)

  labels = normal.copy()
  if outliers_as_singletons:
    first_new = sizes.size
  else:
    labels[raw_normal < 0] = -1
    first_new = int(raw_normal.max()) + 1
  split_idx = np.flatnonzero(split)
  labels[split_idx] = first_new + np.arange(split_idx.size, dtype=np.int64)
  return labels, threshold
