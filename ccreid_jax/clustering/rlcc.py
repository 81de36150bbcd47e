"""RLCC soft targets from the consensus of two clusterings (host side, numpy/scipy).

docs/algorithms.md section 6. With the previous labels ``y'`` (K' clusters, sets ``A_j``) and the
current labels ``y`` (K clusters, sets ``B_k``) of the same N samples:

* ``C[j, k] = |A_j & B_k| / (|A_j| + |B_k| - |A_j & B_k|)`` (IoU), row-normalised to ``Cbar``;
* ``q_i = softmax(pred_temp * f_i . c'^T)``: current features against the previous epoch's
  clustering centroids;
* ``P_i = q_i`` on the first RLCC epoch, ``alpha * onehot(y'_i) + (1 - alpha) * q_i`` later;
* ``yhat_i = P_i Cbar`` and ``ytilde_i = alpha * onehot(y_i) + (1 - alpha) * yhat_i``.

Label -1 marks an outlier. Outliers count in the cluster sizes ``|A_j|``, ``|B_k|`` but never in
an intersection. The official code keeps outliers as singleton classes instead; apply
``keep_outliers_as_singletons`` to both labellings (and build the previous centroids from the
singleton labels) to get that behaviour, in which case no outlier rule below ever fires and
the formulas hold verbatim.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
  "consensus_matrix",
  "consensus_stats",
  "keep_outliers_as_singletons",
  "previous_predictions",
  "soft_labels",
]

# Rows are processed in blocks of this many samples so that the float64 (rows, K) temporaries
# stay small whatever N is.
_BLOCK_ROWS = 4096
# A propagated part whose mass is at most this is treated as vanished.
_MIN_MASS = 1e-12


def _as_labels(labels, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {labels.shape}.")
  if (
    labels.size
    and not np.issubdtype(labels.dtype, np.integer)
    and not np.all(labels == np.round(labels))
  ):
    raise ValueError(f"{name} must hold integers.")
  labels = labels.astype(np.int64, copy=False)
  if labels.size and labels.min() < -1:
    raise ValueError(f"{name} may only use -1 (outlier) and 0..K-1.")
  return labels


def _num_classes(labels: np.ndarray, given: int | None, name: str) -> int:
  top = int(labels.max()) + 1 if labels.size else 0
  if given is None:
    return max(top, 0)
  if given < top:
    raise ValueError(f"{name} uses label {top - 1} but only {given} clusters were declared.")
  return int(given)


def keep_outliers_as_singletons(labels) -> np.ndarray:
  """Gives every outlier (-1) its own new class K, K+1, ... in sample order (official RLCC).

  K = max(labels) + 1 (0 when every sample is an outlier). Non-negative labels are unchanged.

  Returns:
    (N,) int64 labels with no -1.
  """
  labels = _as_labels(labels, "labels")
  out = labels.copy()
  outliers = np.flatnonzero(labels < 0)
  first = int(labels.max()) + 1 if labels.size else 0
  out[outliers] = max(first, 0) + np.arange(outliers.size, dtype=np.int64)
  return out


def consensus_matrix(
  prev_labels,
  labels,
  *,
  normalize: bool = True,
  sparse: bool = False,
  num_prev_clusters: int | None = None,
  num_clusters: int | None = None,
):
  """IoU between the previous clusters (rows) and the current clusters (columns).

  Intersections come from one ``np.unique`` over the encoded (y'_i, y_i) pairs of the samples
  that are clustered in both labellings (O(N log N)); cluster sizes count every member, so a
  sample that is an outlier in one labelling enlarges its cluster in the other without ever
  entering an intersection.

  Args:
    prev_labels: (N,) previous labels, -1 = outlier, clusters 0..K'-1.
    labels: (N,) current labels of the same samples, -1 = outlier, clusters 0..K-1.
    normalize: divide every row by its sum (``Cbar``). A row with no intersection at all (a
      previous cluster whose members are all outliers now) stays exactly zero.
    sparse: return a ``scipy.sparse.csr_matrix`` instead of a dense array.
    num_prev_clusters: K' (default max(prev_labels) + 1); larger values add all-zero rows.
    num_clusters: K (default max(labels) + 1); larger values add all-zero columns.

  Returns:
    (K', K) float32 ``Cbar`` (or the raw IoU ``C`` when ``normalize=False``), dense or CSR.
  """
  prev = _as_labels(prev_labels, "prev_labels")
  cur = _as_labels(labels, "labels")
  if prev.shape != cur.shape:
    raise ValueError(
      f"prev_labels {prev.shape} and labels {cur.shape} must have one entry per sample."
    )
  num_prev = _num_classes(prev, num_prev_clusters, "prev_labels")
  num_cur = _num_classes(cur, num_clusters, "labels")

  prev_sizes = np.bincount(prev[prev >= 0], minlength=num_prev)
  cur_sizes = np.bincount(cur[cur >= 0], minlength=num_cur)
  both = (prev >= 0) & (cur >= 0)
  if both.any():
    pairs, inter = np.unique(prev[both] * num_cur + cur[both], return_counts=True)
    rows, cols = np.divmod(pairs, num_cur)
  else:
    rows = cols = inter = np.zeros(0, dtype=np.int64)
  values = inter / (prev_sizes[rows] + cur_sizes[cols] - inter).astype(np.float64)
  if normalize:
    # Every listed entry is positive, so a row that appears here has a positive sum; rows
    # that never appear are the all-zero ones and are left alone.
    row_sums = np.bincount(rows, weights=values, minlength=num_prev)
    values = values / row_sums[rows]

  shape = (num_prev, num_cur)
  values = values.astype(np.float32)
  if sparse:
    return sp.csr_matrix((values, (rows, cols)), shape=shape)
  out = np.zeros(shape, dtype=np.float32)
  out[rows, cols] = values
  return out


def previous_predictions(features, prev_centroids, *, pred_temp: float = 30.0) -> np.ndarray:
  """``q = softmax(pred_temp * features . prev_centroids^T)`` row by row.

  Args:
    features: (N, D) current features, L2-normalised by the caller.
    prev_centroids: (K', D) L2-normalised centroids of the previous epoch's clusters (from the
      clustering, not the momentum-updated memory).
    pred_temp: inverse temperature (30 in RLCC).

  Returns:
    (N, K') float32, rows summing to 1; (N, 0) when K' = 0.
  """
  f = np.asarray(features)
  c = np.asarray(prev_centroids)
  if f.ndim != 2 or c.ndim != 2 or f.shape[1] != c.shape[1]:
    raise ValueError(f"features {f.shape} and prev_centroids {c.shape} must be (N, D) and (K', D).")
  if not pred_temp > 0:
    raise ValueError(f"pred_temp must be positive, got {pred_temp}.")
  out = np.zeros((f.shape[0], c.shape[0]), dtype=np.float32)
  if c.shape[0] == 0:
    return out
  c64 = c.astype(np.float64, copy=False)
  for start in range(0, f.shape[0], _BLOCK_ROWS):
    out[start : start + _BLOCK_ROWS] = _softmax(
      pred_temp * (f[start : start + _BLOCK_ROWS].astype(np.float64, copy=False) @ c64.T)
    )
  return out


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  np.exp(z, out=z)
  z /= z.sum(axis=1, keepdims=True)
  return z


def soft_labels(
  features,
  labels,
  prev_labels,
  prev_centroids,
  *,
  use_prev_onehot: bool,
  alpha: float = 0.9,
  beta: float = 0.0,
  pred_temp: float = 30.0,
  consensus=None,
) -> np.ndarray:
  """RLCC targets ``ytilde`` (N, K) for the current clustering.

  ``yhat_i`` is assembled from two parts in K-space, each a distribution:

  * hard part ``h_i = Cbar[y'_i]`` (the previous hard label carried through the consensus);
  * soft part ``s_i = q_i Cbar`` (the prediction against the previous centroids, carried
    through the consensus).

  Because ``P_i Cbar`` is linear in ``P_i``, ``P_i Cbar = alpha * h_i + (1 - alpha) * s_i`` from
  the second RLCC epoch on and ``s_i`` on the first. ``beta`` mixes in hard propagation:
  ``yhat_i = beta * h_i + (1 - beta) * P_i Cbar`` (0 = soft, 1 = hard ``Cbar[y'_i]``).
  Finally ``ytilde_i = alpha * onehot(y_i) + (1 - alpha) * yhat_i``.

  Outlier rules (outliers dropped; none of them fires in singleton-outlier mode, where every
  ``Cbar`` row and every ``s_i`` already sums to 1):

  * current outliers (``y_i = -1``) get an all-zero row: the trainer uses non-outlier rows only;
  * previous outliers (``y'_i = -1``) have no ``Cbar[y'_i]``: their hard part ``h_i`` is the
    current one-hot ``onehot(y_i)``;
  * a dissolved previous cluster (``Cbar`` row all zero, every member an outlier now) likewise
    gives its former members ``h_i = onehot(y_i)``;
  * ``s_i`` loses the mass ``q_i`` put on dissolved clusters; it is renormalised to sum 1 when
    its mass exceeds 1e-12, and replaced by ``onehot(y_i)`` otherwise (e.g. K' = 0).

  So every non-outlier row is non-negative and sums to 1, and ``alpha = 1`` gives exactly
  ``onehot(y_i)``.

  Args:
    features: (N, D) current features, L2-normalised.
    labels: (N,) current labels, -1 = outlier, clusters 0..K-1 (K = max + 1).
    prev_labels: (N,) previous-epoch labels of the same samples, clusters 0..K'-1.
    prev_centroids: (K', D) previous-epoch clustering centroids, L2-normalised; K' fixes the
      number of previous clusters and must exceed max(prev_labels).
    use_prev_onehot: False on the first RLCC epoch (``P_i = q_i``), True afterwards.
    alpha: weight of the current one-hot (and of the previous one-hot inside ``P_i``).
    beta: 0 = soft propagation ``P_i Cbar``, 1 = hard propagation ``Cbar[y'_i]``; in between
      a convex mix of the two.
    pred_temp: inverse temperature of ``q_i``.
    consensus: optional precomputed ``Cbar`` (K', K), dense or sparse, e.g. to share it with
      ``consensus_stats``; by default computed from the labels.

  Returns:
    (N, K) float32 targets.
  """
  y = _as_labels(labels, "labels")
  y_prev = _as_labels(prev_labels, "prev_labels")
  f = np.asarray(features)
  c = np.asarray(prev_centroids)
  if y.shape != y_prev.shape or f.ndim != 2 or f.shape[0] != y.shape[0]:
    raise ValueError(
      f"features {f.shape}, labels {y.shape} and prev_labels {y_prev.shape} must "
      "describe the same N samples."
    )
  if c.ndim != 2 or c.shape[1] != f.shape[1]:
    raise ValueError(f"prev_centroids {c.shape} must be (K', {f.shape[1]}).")
  for name, value in (("alpha", alpha), ("beta", beta)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must lie in [0, 1], got {value}.")
  num_prev = c.shape[0]
  num_cur = _num_classes(y, None, "labels")
  if y_prev.size and int(y_prev.max()) >= num_prev:
    raise ValueError(
      f"prev_labels uses label {int(y_prev.max())} but prev_centroids has only {num_prev} rows."
    )

  if consensus is None:
    cbar = consensus_matrix(y_prev, y, num_prev_clusters=num_prev, num_clusters=num_cur)
  else:
    cbar = consensus.toarray() if sp.issparse(consensus) else np.asarray(consensus)
    if cbar.shape != (num_prev, num_cur):
      raise ValueError(f"consensus {cbar.shape} must be (K', K) = {(num_prev, num_cur)}.")
  cbar = cbar.astype(np.float64)
  live = cbar.sum(axis=1) > 0  # previous clusters that did not dissolve
  # One extra zero row, so that the previous outliers (-1) index something valid (the last row).
  cbar_rows = np.vstack([cbar, np.zeros((1, num_cur))])

  # yhat = w_hard * h + w_soft * s
  w_soft = (1.0 - beta) * ((1.0 - alpha) if use_prev_onehot else 1.0)
  w_hard = 1.0 - w_soft

  out = np.zeros((y.shape[0], num_cur), dtype=np.float32)
  rows = np.flatnonzero(y >= 0)
  if alpha == 1.0:
    out[rows, y[rows]] = 1.0
    return out
  for start in range(0, rows.size, _BLOCK_ROWS):
    block = rows[start : start + _BLOCK_ROWS]
    onehot = np.zeros((block.size, num_cur))
    onehot[np.arange(block.size), y[block]] = 1.0
    yhat = np.zeros_like(onehot)
    if w_hard > 0:
      prev = y_prev[block]
      has_prev = prev >= 0
      has_prev[has_prev] = live[prev[has_prev]]
      hard = np.where(has_prev[:, None], cbar_rows[prev], onehot)
      yhat += w_hard * hard
    if w_soft > 0:
      q = previous_predictions(f[block], c, pred_temp=pred_temp).astype(np.float64)
      soft = q @ cbar
      mass = soft.sum(axis=1, keepdims=True)
      ok = mass > _MIN_MASS
      soft = np.where(ok, soft / np.where(ok, mass, 1.0), onehot)
      yhat += w_soft * soft
    out[block] = alpha * onehot + (1.0 - alpha) * yhat
  return out


def consensus_stats(
  prev_labels, labels, targets, *, num_prev_clusters: int | None = None, consensus=None
) -> dict:
  """Per-epoch RLCC log entries (plain numbers).

  Args:
    prev_labels: (N,) previous labels, -1 = outlier.
    labels: (N,) current labels, -1 = outlier.
    targets: (N, K) targets from ``soft_labels``; only non-outlier rows are read.
    num_prev_clusters: K' (default max(prev_labels) + 1, or the rows of ``consensus``).
    consensus: optional precomputed ``Cbar`` (K', K), dense or sparse.

  Returns:
    dict with ``num_clusters`` (K), ``num_prev_clusters`` (K'), ``num_dissolved`` (previous
    clusters with an all-zero ``Cbar`` row: no member is clustered now), ``num_new`` (current
    clusters none of whose members was in a previous cluster), ``mean_max_target`` (mean over
    non-outliers of max(ytilde_i)) and ``frac_argmax_changed`` (fraction of non-outliers with
    argmax(ytilde_i) != y_i).
  """
  y = _as_labels(labels, "labels")
  y_prev = _as_labels(prev_labels, "prev_labels")
  targets = np.asarray(targets)
  num_cur = _num_classes(y, None, "labels")
  if targets.shape != (y.shape[0], num_cur):
    raise ValueError(f"targets {targets.shape} must be (N, K) = {(y.shape[0], num_cur)}.")
  if consensus is not None and num_prev_clusters is None:
    num_prev_clusters = consensus.shape[0]
  if consensus is None:
    consensus = consensus_matrix(
      y_prev, y, num_prev_clusters=num_prev_clusters, num_clusters=num_cur, sparse=True
    )
  cbar = sp.csr_matrix(consensus, copy=True)
  cbar.eliminate_zeros()
  num_prev = cbar.shape[0]
  row_nnz = np.diff(cbar.indptr)
  col_nnz = np.bincount(cbar.indices, minlength=num_cur)

  rows = np.flatnonzero(y >= 0)
  if rows.size:
    picked = targets[rows]
    mean_max = float(picked.max(axis=1).mean()) if num_cur else 0.0
    changed = float(np.mean(picked.argmax(axis=1) != y[rows]))
  else:
    mean_max = changed = 0.0
  return {
    "num_clusters": int(num_cur),
    "num_prev_clusters": int(num_prev),
    "num_dissolved": int(np.sum(row_nnz == 0)),
    "num_new": int(np.sum(col_nnz == 0)),
    "mean_max_target": mean_max,
    "frac_argmax_changed": changed,
  }
