"""k-reciprocal re-ranking of a query x gallery distance matrix (Zhong et al., CVPR 2017).

This is the test-time re-ranking of docs/algorithms.md section 7, computed the way the reference
applies it, step by step (N = Q + G, every index below runs over queries then gallery):

1. Stack ``[[q_q, q_g], [q_g^T, g_g]]`` and square it element-wise (the inputs are already
   squared Euclidean distances, so this is the 4th power of the Euclidean distance). Divide
   every column by its maximum and transpose: row ``i`` of the result ``D`` is column ``i``
   of the stacked matrix over that column's maximum. ``D`` is used from here on.
2. ``R[i]``: the first ``k1 + 1`` entries of the ascending order of row ``i`` of ``D``
   (the point itself included, normally first); ties are broken by index (a stable sort; the
   reference's quicksort leaves them arbitrary). ``H[i]``: the first ``round(k1 / 2) + 1``.
3. ``Rk(i)``: the ``j`` in ``R[i]`` with ``i`` in ``R[j]``; ``Hk(c)``: the ``j`` in ``H[c]``
   with ``c`` in ``H[j]``.
4. ``E(i) = Rk(i)`` plus ``Hk(c)`` for every ``c`` in ``Rk(i)`` with
   ``|Hk(c) & Rk(i)| > 2/3 |Hk(c)|`` (strict).
5. ``V[i, j] = exp(-D[i, j]) / sum_{l in E(i)} exp(-D[i, l])`` for ``j`` in ``E(i)``, else 0.
6. If ``k2 != 1``: ``V[i] <- mean(V[j])`` over the first ``k2`` entries of the order of row i.
7. For the query rows only: ``m(i, j) = sum_k min(V[i, k], V[j, k])``,
   ``jaccard(i, j) = 1 - m / (2 - m)``.
8. ``final = (1 - lambda) * jaccard + lambda * D``, returned for the query x gallery block.

Memory: ``D`` is the only dense (N, N) array (float32, 4 N^2 bytes: 1.5 GB for Market-1501's
3,368 + 15,913 images); the neighbour lists are O(N k1), ``V`` is a sparse matrix with at most
a few hundred entries per row, and the Jaccard term is accumulated for blocks of queries
against the gallery only. The reference also holds dense (N, N) ``V``, ``V_qe``, ranks and
Jaccard matrices (about 5x more).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["rerank"]

# Rows of D handled at once when selecting the first k1 + 1 entries of each row.
_SORT_ELEMENTS = 1 << 24
# (query, gallery) contributions accumulated at once in the Jaccard term.
_PAIR_BUDGET = 1 << 22


def rerank(
  q_g_dist: np.ndarray,
  q_q_dist: np.ndarray,
  g_g_dist: np.ndarray,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
) -> np.ndarray:
  """Re-ranked (Q, G) float32 distances from the squared-Euclidean q-g, q-q and g-g matrices.

  Args:
    q_g_dist: (Q, G) distances between queries and gallery (e.g. ``pairwise_distance``).
    q_q_dist: (Q, Q) distances between queries.
    g_g_dist: (G, G) distances between gallery entries.
    k1: size of the k-reciprocal neighbourhoods (``k1 + 1`` entries, self included).
    k2: query-expansion size (1 = none).
    lambda_value: weight of the normalised original distance in the result, in [0, 1].

  Returns:
    (Q, G) float32 ``(1 - lambda) * jaccard + lambda * D`` (module docstring). Smaller is
    more similar; pass it to ``evaluate_ranking`` like any distance matrix.

  Raises:
    ValueError: on shapes that do not fit together, NaN, or out-of-range arguments.
  """
  q_g = np.asarray(q_g_dist)
  q_q = np.asarray(q_q_dist)
  g_g = np.asarray(g_g_dist)
  if q_g.ndim != 2 or q_g.shape[0] == 0 or q_g.shape[1] == 0:
    raise ValueError(f"q_g_dist must be a non-empty (Q, G) matrix, got shape {q_g.shape}.")
  num_q, num_g = q_g.shape
  if q_q.shape != (num_q, num_q):
    raise ValueError(f"q_q_dist must be ({num_q}, {num_q}) for {num_q} queries, got {q_q.shape}.")
  if g_g.shape != (num_g, num_g):
    raise ValueError(
      f"g_g_dist must be ({num_g}, {num_g}) for {num_g} gallery entries, got {g_g.shape}."
    )
  if int(k1) != k1 or k1 < 1:
    raise ValueError(f"k1 must be a positive integer, got {k1}.")
  if int(k2) != k2 or k2 < 1:
    raise ValueError(f"k2 must be a positive integer, got {k2}.")
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}.")
  for name, m in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
    if np.isnan(m).any():
      raise ValueError(f"{name} contains NaN.")
  k1, k2, lambda_value = int(k1), int(k2), float(lambda_value)

  dist = _normalised_distance(q_g, q_q, g_g)
  n = dist.shape[0]
  # The reference slices a full argsort, so k + 1 > N simply means the whole row.
  near = _first_entries(dist, min(k1 + 1, n))
  near_half = near[:, : min(int(np.around(k1 / 2.0)) + 1, n)]
  v = _encode(dist, near, _reciprocal(near), near_half, _reciprocal(near_half))
  if k2 != 1:
    v = _query_expansion(
      v, near if k2 <= near.shape[1] else _first_entries(dist, min(k2, n)), min(k2, n)
    )
  jaccard = _query_jaccard(v, num_q)
  final = jaccard * np.float32(1.0 - lambda_value)
  final += dist[:num_q, num_q:] * np.float32(lambda_value)
  return final


def _normalised_distance(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> np.ndarray:
  """Step 1: the (N, N) float32 matrix D.

  With S the stacked squared matrix, D = (S / colmax(S)).T, i.e. ``D[i, j] = S[j, i] /
  max_l S[l, i]``. It is built directly as the transposed stack (whose row maxima are S's
  column maxima), squared and divided in place: one N x N allocation.
  """
  num_q, num_g = q_g.shape
  n = num_q + num_g
  dist = np.empty((n, n), np.float32)
  dist[:num_q, :num_q] = q_q.T
  dist[:num_q, num_q:] = q_g
  dist[num_q:, :num_q] = q_g.T
  dist[num_q:, num_q:] = g_g.T
  np.square(dist, out=dist)
  dist /= dist.max(axis=1, keepdims=True)
  return dist


def _first_entries(dist: np.ndarray, k: int) -> np.ndarray:
  """(N, k) int32: the first k entries of a stable ascending argsort of every row.

  Exact without sorting whole rows: entries not larger than the k-th smallest value of the
  row are the only candidates; they are ordered by (value, column) and the first k kept.
  """
  n = dist.shape[0]
  out = np.empty((n, k), np.int32)
  rows_per_block = max(1, _SORT_ELEMENTS // n)
  for start in range(0, n, rows_per_block):
    block = dist[start : start + rows_per_block]
    kth = np.partition(block, k - 1, axis=1)[:, k - 1]
    row, col = np.nonzero(block <= kth[:, None])
    order = np.lexsort((col, block[row, col], row))
    row, col = row[order], col[order]
    first_of_row = np.searchsorted(row, np.arange(block.shape[0]))
    position = np.arange(row.size) - first_of_row[row]
    keep = position < k
    out[start : start + block.shape[0]] = col[keep].reshape(block.shape[0], k)
  return out


def _reciprocal(near: np.ndarray) -> np.ndarray:
  """(N, k) bool: ``near[i, m]`` has ``i`` among its own ``k`` entries."""
  n = near.shape[0]
  mask = np.empty(near.shape, bool)
  rows_per_block = max(1, _SORT_ELEMENTS // (near.shape[1] ** 2))
  for start in range(0, n, rows_per_block):
    idx = near[start : start + rows_per_block]
    self_index = np.arange(start, start + idx.shape[0])[:, None, None]
    mask[start : start + idx.shape[0]] = (near[idx] == self_index).any(axis=2)
  return mask


def _encode(
  dist: np.ndarray, near: np.ndarray, recip: np.ndarray, half: np.ndarray, half_recip: np.ndarray
) -> sp.csr_matrix:
  """Steps 4-5: the sparse (N, N) float32 encoding V (rows sum to 1)."""
  n, k = near.shape
  kh = half.shape[1]
  sentinel = n  # marks an unused candidate slot; sorts after every real column
  rows, cols, vals = [], [], []
  rows_per_block = max(1, _SORT_ELEMENTS // (k * k * kh))
  for start in range(0, n, rows_per_block):
    r_i = near[start : start + rows_per_block]  # (b, k)
    m_i = recip[start : start + rows_per_block]  # (b, k)
    b = r_i.shape[0]
    h_c = half[r_i]  # (b, k, kh): H[c], c in R[i]
    m_c = half_recip[r_i]  # (b, k, kh): in Hk(c)
    in_rk = ((h_c[..., None] == r_i[:, None, None, :]) & m_i[:, None, None, :]).any(axis=3)
    overlap = (in_rk & m_c).sum(axis=2)  # |Hk(c) & Rk(i)|
    size = m_c.sum(axis=2)  # |Hk(c)|
    accept = m_i & (overlap > 2.0 / 3.0 * size)  # (b, k)
    candidates = np.concatenate(
      [
        np.where(m_i, r_i, sentinel),
        np.where(accept[..., None] & m_c, h_c, sentinel).reshape(b, k * kh),
      ],
      axis=1,
    )
    candidates.sort(axis=1)
    duplicate = np.zeros(candidates.shape, bool)
    duplicate[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    valid = (candidates != sentinel) & ~duplicate
    local_row, slot = np.nonzero(valid)
    col = candidates[local_row, slot]
    row = local_row + start
    weight = np.exp(-dist[row, col])  # float32
    total = np.bincount(local_row, weights=weight, minlength=b).astype(np.float32)
    rows.append(row)
    cols.append(col)
    vals.append(weight / total[local_row])
  row = np.concatenate(rows)
  return sp.csr_matrix(
    (np.concatenate(vals).astype(np.float32), (row, np.concatenate(cols))), shape=(n, n)
  )


def _query_expansion(v: sp.csr_matrix, near: np.ndarray, k2: int) -> sp.csr_matrix:
  """Step 6: ``V[i] <- mean(V[j] for j in the first k2 entries of row i's order)``."""
  n = v.shape[0]
  pick = sp.csr_matrix(
    (
      np.ones(n * k2, np.float32),
      near[:, :k2].reshape(-1).astype(np.int64),
      np.arange(0, n * k2 + 1, k2),
    ),
    shape=(n, n),
  )
  out = (pick @ v).tocsr()
  out.data /= np.float32(k2)
  return out


def _query_jaccard(v: sp.csr_matrix, num_q: int) -> np.ndarray:
  """Step 7 for the query rows against the gallery columns: (Q, G) float32."""
  n = v.shape[0]
  num_g = n - num_q
  by_col = v.tocsc()
  by_col.sort_indices()
  col_start, col_nnz = by_col.indptr[:-1], np.diff(by_col.indptr)
  query_rows = v[:num_q].tocsr()
  query_rows.sort_indices()
  # Contributions each query row generates: sum of the column counts of its support.
  per_row = np.add.reduceat(np.append(col_nnz[query_rows.indices], 0), query_rows.indptr[:-1]) * (
    np.diff(query_rows.indptr) > 0
  )
  out = np.empty((num_q, num_g), np.float32)
  start = 0
  while start < num_q:
    cum = np.cumsum(per_row[start:])
    stop = start + max(1, int(np.searchsorted(cum, _PAIR_BUDGET, side="right")))
    lo, hi = query_rows.indptr[start], query_rows.indptr[stop]
    support = query_rows.indices[lo:hi]  # columns k
    value = query_rows.data[lo:hi]  # V[i, k]
    local = np.repeat(np.arange(stop - start), np.diff(query_rows.indptr[start : stop + 1]))
    counts = col_nnz[support]
    total = int(counts.sum())
    # Positions in by_col of every (i, k, j): column k's entries, concatenated.
    offset = np.repeat(col_start[support] - np.cumsum(counts) + counts, counts)
    pos = offset + np.arange(total)
    other = by_col.indices[pos]  # rows j with V[j, k] != 0
    contrib = np.minimum(np.repeat(value, counts), by_col.data[pos])
    local_i = np.repeat(local, counts)
    keep = other >= num_q
    flat = local_i[keep] * num_g + (other[keep] - num_q)
    overlap = np.bincount(flat, weights=contrib[keep], minlength=(stop - start) * num_g).astype(
      np.float32
    )
    overlap = overlap.reshape(stop - start, num_g)
    out[start:stop] = 1.0 - overlap / (2.0 - overlap)
    start = stop
  return out
