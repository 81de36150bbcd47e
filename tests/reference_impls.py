"""Brute-force reference implementations, used only by the tests.

Direct, loop-per-sample transcriptions of docs/algorithms.md sections 5 and 7 with dense N x N
matrices and Python sets: slow, but easy to check line by line against the text.
"""

import numpy as np
from sklearn.metrics import average_precision_score


def knn_lists(features, k):
  """First k entries of every row of a stable argsort of the dense 2 - 2 x.x^T matrix."""
  x = np.asarray(features, dtype=np.float32)
  dist = 2.0 - 2.0 * (x @ x.T)
  rank = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return rank, dist


def k_reciprocal(rank, i, k):
  """j among the first k+1 entries of i's list whose own first k+1 entries contain i."""
  forward = rank[i, : k + 1]
  return [int(j) for j in forward if i in set(rank[j, : k + 1].tolist())]


def jaccard_dense(features, k1, k2):
  """Dense float32 Jaccard distance, step by step as written in section 5."""
  x = np.asarray(features, dtype=np.float32)
  n = x.shape[0]
  rank, dist = knn_lists(x, k1)  # k1 entries, the point itself included
  k_half = int(np.round(k1 / 2))
  v = np.zeros((n, n), dtype=np.float64)
  for i in range(n):
    r_i = k_reciprocal(rank, i, k1)
    expanded = set(r_i)
    for c in r_i:
      r_c = k_reciprocal(rank, c, k_half)
      if len(set(r_c) & set(r_i)) > 2 / 3 * len(r_c):
        expanded |= set(r_c)
    cols = sorted(expanded)
    if not cols:
      continue
    logits = -dist[i, cols].astype(np.float64)
    w = np.exp(logits - logits.max())
    v[i, cols] = w / w.sum()
  if k2 > 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = v[rank[i, :k2]].mean(axis=0)
    v = v_qe
  out = np.zeros((n, n), dtype=np.float64)
  for i in range(n):
    for j in range(n):
      m = np.minimum(v[i], v[j]).sum()
      out[i, j] = 1.0 - m / (2.0 - m)
  out[out < 0] = 0.0
  return out.astype(np.float32)


def squared_euclidean(q, g):
  """||q_i - g_j||^2 by a loop over pairs, float64."""
  q = np.asarray(q, dtype=np.float64)
  g = np.asarray(g, dtype=np.float64)
  out = np.zeros((len(q), len(g)))
  for i in range(len(q)):
    for j in range(len(g)):
      out[i, j] = np.sum((q[i] - g[j]) ** 2)
  return out


def evaluate_loop(
  distmat, query_identities, gallery_identities, query_cameras, gallery_cameras, topk=(1, 5, 10)
):
  """Per-query loop: same-identity-and-same-camera entries dropped, sklearn AP, first-match CMC."""
  aps = []
  first_ranks = []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    ranked = []
    for j in order:
      if gallery_identities[j] == query_identities[i] and gallery_cameras[j] == query_cameras[i]:
        continue
      ranked.append(j)
    ranked = np.array(ranked, dtype=np.int64)
    matches = gallery_identities[ranked] == query_identities[i]
    if not matches.any():
      continue
    aps.append(average_precision_score(matches, -distmat[i, ranked]))
    first_ranks.append(int(np.flatnonzero(matches)[0]) + 1)
  out = {"mAP": float(np.mean(aps))}
  for k in topk:
    out[f"rank{k}"] = float(np.mean([r <= k for r in first_ranks]))
  return out


def densify(mat):
  """A sparse distance in the convention of ``jaccard_distance`` as a dense array (absent = 1)."""
  out = np.ones(mat.shape, dtype=np.float32)
  coo = mat.tocoo()
  out[coo.row, coo.col] = coo.data
  return out
