"""k-reciprocal Jaccard distance between training features (host side, numpy/scipy).

This is the distance Cluster Contrast clusters with every epoch (ALGORITHMS.md, section 5).
Given L2-normalised features ``x`` (N x D):

1. ``R[i]``: the first ``k1`` entries of the kNN list of ``i`` by ``2 - 2 x_i.x_j``, the
   point itself included (normally in first place).
2. ``Rk(i, k)``: the ``j`` among the first ``k + 1`` entries of ``R[i]`` whose own first
   ``k + 1`` entries contain ``i``. The list only has ``k1`` entries, so ``Rk(i, k1)`` looks at
   all ``k1`` of them; ``Rk(i, k')`` with ``k' = round-half-even(k1 / 2)`` looks at ``k' + 1``.
3. ``E(i)``: ``Rk(i, k1)`` plus ``Rk(c, k')`` for every ``c`` in ``Rk(i, k1)`` with
   ``|Rk(c, k') & Rk(i, k1)| > 2/3 |Rk(c, k')|`` (strict).
4. ``V[i, j] = softmax_{j in E(i)}(-(2 - 2 x_i.x_j))``, zero outside ``E(i)``.
5. If ``k2 > 1``: ``V[i] <- mean(V[j])`` over the first ``k2`` entries ``j`` of ``R[i]``.
6. ``d(i, j) = max(0, 1 - m / (2 - m))`` with ``m = sum_k min(V[i, k], V[j, k])``.

Only the kNN search touches dense (block x N) arrays; everything after it is sparse, O(N k)
memory. The result is a ``scipy.sparse.csr_matrix`` whose **absent entries mean distance 1.0**
(the pair shares no support) and whose diagonal is always stored explicitly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["jaccard_distance", "knn"]

# Upper bound on the number of (row, column) candidate pairs handled in one vectorised step of
# the min-sum (and on the cells of its dense block buffer): a few hundred MB of temporaries.
_PAIR_BUDGET = 1 << 22
# Upper bound on the number of float32 elements gathered at once for pairwise dot products.
_GATHER_BUDGET = 1 << 24


def _check_features(features: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(features, dtype=np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf.")
  return x


def knn(features: np.ndarray, k: int, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest neighbours of every row among all rows (the row itself included).

  The distance is ``2 - 2 x_i.x_j`` (the squared L2 distance of unit vectors), computed in
  float32 with one matmul per block of ``block_size`` query rows, so at most
  ``block_size x N`` distances are held at once.

  Tie-break (deterministic, documented): each row is ordered by the float32 distance value, and
  equal values by increasing column index, i.e. exactly what a stable argsort of the row gives.
  An exact duplicate of ``i`` with a smaller index therefore comes before ``i`` itself.

  Args:
    features: (N, D) features, assumed L2-normalised (not checked).
    k: number of neighbours to return, ``1 <= k <= N``.
    block_size: number of query rows per matmul block.

  Returns:
    ``(indices, distances)``: int64 (N, k) and float32 (N, k), row ``i`` sorted as above.
  """
  x = _check_features(features)
  n = x.shape[0]
  k = int(k)
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, N={n}], got {k}.")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  out_idx = np.empty((n, k), dtype=np.int64)
  out_dist = np.empty((n, k), dtype=np.float32)
  for start in range(0, n, block_size):
    stop = min(start + block_size, n)
    dist = x[start:stop] @ x.T
    dist *= -2.0
    dist += 2.0
    if k == n:
      order = np.argsort(dist, axis=1, kind="stable")
      out_idx[start:stop] = order
      out_dist[start:stop] = np.take_along_axis(dist, order, axis=1)
      continue
    # Candidates: every entry not larger than the k-th smallest value of its row. Ties at the
    # k-th value can make a row have more than k candidates; the sort below keeps the k
    # candidates with the smallest (distance, index).
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(dist <= kth[:, None])  # row-major: columns ascending per row
    vals = dist[rows, cols]
    order = np.lexsort((cols, vals, rows))  # by row, then distance, then column index
    counts = np.bincount(rows, minlength=stop - start)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    take = order[(first[:, None] + np.arange(k)[None, :]).ravel()]
    out_idx[start:stop] = cols[take].reshape(-1, k)
    out_dist[start:stop] = vals[take].reshape(-1, k)
  return out_idx, out_dist


def _list_prefix_matrix(indices: np.ndarray, length: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix with row i = the first ``length`` entries of kNN list i."""
  cols = np.ascontiguousarray(indices[:, :length]).ravel()
  indptr = np.arange(0, n * length + 1, length, dtype=np.int64)
  mat = sp.csr_matrix((np.ones(cols.size, dtype=np.int32), cols, indptr), shape=(n, n))
  mat.sort_indices()
  return mat


def _reciprocal_sets(indices: np.ndarray, length: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix with row i = {j in first `length` of i's list : i in first `length` of j's}."""
  forward = _list_prefix_matrix(indices, length, n)
  mutual = forward.multiply(forward.T).tocsr()
  mutual.sort_indices()
  return mutual


def _expanded_support(indices: np.ndarray, k1: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix whose row i is the expanded set E(i) (steps 2-3)."""
  k_list = indices.shape[1]
  k_half = int(np.round(k1 / 2))  # numpy rounds half to even: 15 for k1 = 30
  r_full = _reciprocal_sets(indices, min(k1 + 1, k_list), n)
  r_half = _reciprocal_sets(indices, min(k_half + 1, k_list), n)
  half_size = np.diff(r_half.indptr)
  # overlap[i, c] = |Rk(i, k1) & Rk(c, k')|, kept only where c is in Rk(i, k1).
  overlap = r_full.multiply(r_full @ r_half.T).tocoo()
  # Strict "> 2/3 |Rk(c, k')|" in integers (same as the float test `c > 2/3 * s` for s <= 2000).
  keep = 3 * overlap.data.astype(np.int64) > 2 * half_size[overlap.col]
  select = sp.csr_matrix(
      (np.ones(int(keep.sum()), dtype=np.int32), (overlap.row[keep], overlap.col[keep])),
      shape=(n, n))
  support = (r_full + select @ r_half).tocsr()
  support.sum_duplicates()  # canonical: sorted column indices, one entry per pair
  support.data[:] = 1
  return support


def _pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """float32 x[rows[p]].x[cols[p]] for every pair p, gathered in bounded chunks."""
  out = np.empty(rows.size, dtype=np.float32)
  step = max(1, _GATHER_BUDGET // max(1, x.shape[1]))
  for s in range(0, rows.size, step):
    e = min(s + step, rows.size)
    out[s:e] = np.einsum("ij,ij->i", x[rows[s:e]], x[cols[s:e]])
  return out


def _row_softmax(support: sp.csr_matrix, logits: np.ndarray) -> np.ndarray:
  """Softmax of ``logits`` (aligned with ``support.data``) within each CSR row, float64."""
  logits = logits.astype(np.float64)
  counts = np.diff(support.indptr)
  nonempty = counts > 0
  if not nonempty.any():
    return logits
  starts = support.indptr[:-1][nonempty]
  row_max = np.maximum.reduceat(logits, starts)
  weights = np.exp(logits - np.repeat(row_max, counts[nonempty]))
  row_sum = np.add.reduceat(weights, starts)
  return weights / np.repeat(row_sum, counts[nonempty])


def _distance_from_support(v: sp.csr_matrix) -> sp.csr_matrix:
  """Steps 6 and storage: the Jaccard distance CSR from the (query-expanded) V.

  For each row i, ``m[i, j] = sum_k min(v[i, k], v[j, k])`` runs over the k shared by rows i
  and j: for every nonzero (i, k) of ``v`` the partners j are the nonzeros of column k (CSC).
  Rows are processed in blocks; a block's (i, j, min) contributions are summed with
  ``np.bincount`` into a dense (block x N) float64 buffer, whose nonzeros come out already in
  canonical CSR order. Memory is bounded by ``_PAIR_BUDGET`` pairs and ``_PAIR_BUDGET`` buffer
  cells per block. All stored values of ``v`` must be positive (softmax weights are).
  """
  n = v.shape[0]
  vc = v.tocsc()
  vc.sort_indices()
  col_nnz = np.diff(vc.indptr).astype(np.int64)
  row_nnz = np.diff(v.indptr).astype(np.int64)
  entry_rows = np.repeat(np.arange(n), row_nnz)
  row_pairs = np.bincount(entry_rows, weights=col_nnz[v.indices], minlength=n)
  cum_pairs = np.cumsum(row_pairs.astype(np.int64))
  max_rows = max(1, _PAIR_BUDGET // n)

  out_indices, out_data = [], []
  out_counts = np.zeros(n, dtype=np.int64)
  start = 0
  while start < n:
    base = cum_pairs[start - 1] if start > 0 else 0
    stop = int(np.searchsorted(cum_pairs, base + _PAIR_BUDGET, side="right"))
    stop = min(max(stop, start + 1), start + max_rows, n)
    lo, hi = v.indptr[start], v.indptr[stop]
    b = stop - start
    # Entry e of v (row i, column k, value v_ik) meets every nonzero of column k.
    ent_row = np.repeat(np.arange(b, dtype=np.int64), row_nnz[start:stop])
    ent_col = v.indices[lo:hi]
    reps = col_nnz[ent_col]
    total = int(reps.sum())
    offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
    partner = np.repeat(vc.indptr[ent_col].astype(np.int64), reps) + offset
    mins = np.minimum(np.repeat(v.data[lo:hi], reps), vc.data[partner])
    code = np.repeat(ent_row * n, reps) + vc.indices[partner]
    buf = np.bincount(code, weights=mins, minlength=b * n).reshape(b, n)
    rows, cols = np.nonzero(buf)
    m = buf[rows, cols]
    d = np.maximum(1.0 - m / (2.0 - m), 0.0).astype(np.float32)
    diag = cols == rows + start
    keep = (d < 1.0) | diag
    rows, cols, d = rows[keep], cols[keep], d[keep]
    # A point with an empty V row shares nothing, not even with itself: store its 1.0.
    missing = np.flatnonzero(buf[np.arange(b), np.arange(start, stop)] == 0)
    if missing.size:
      rows = np.concatenate((rows, missing))
      cols = np.concatenate((cols, missing + start))
      d = np.concatenate((d, np.ones(missing.size, dtype=np.float32)))
      order = np.lexsort((cols, rows))
      rows, cols, d = rows[order], cols[order], d[order]
    out_counts[start:stop] = np.bincount(rows, minlength=b)
    out_indices.append(cols.astype(np.int32 if n < 2**31 else np.int64))
    out_data.append(d)
    start = stop

  indptr = np.zeros(n + 1, dtype=np.int64)
  np.cumsum(out_counts, out=indptr[1:])
  out = sp.csr_matrix((np.concatenate(out_data), np.concatenate(out_indices), indptr),
                      shape=(n, n))
  out.has_sorted_indices = True
  return out


def jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6, *,
                     block_size: int = 4096) -> sp.csr_matrix:
  """k-reciprocal Jaccard distance of Cluster Contrast, as a sparse N x N float32 matrix.

  Args:
    features: (N, D) L2-normalised features (cast to float32).
    k1: length of the kNN list (self included) and of the k-reciprocal neighbourhood. When
      ``k1 > N`` the list holds all N points.
    k2: query-expansion size; ``k2 == 1`` disables query expansion (as in the reference).
    block_size: rows per kNN matmul block (see ``knn``, including its tie-break).

  Returns:
    ``scipy.sparse.csr_matrix`` (N, N) float32, symmetric, canonical (sorted indices, no
    duplicates). Stored: every pair with distance < 1, and the whole diagonal (explicitly,
    even where its value is 0; it is 1 only for a point whose V row is empty, which needs many
    exact duplicates). **Absent entries mean distance 1.0.** Callers must not call
    ``eliminate_zeros`` on it: that would drop the diagonal zeros and turn them into 1.0.
  """
  x = _check_features(features)
  n = x.shape[0]
  k1, k2 = int(k1), int(k2)
  if k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}.")
  indices, _ = knn(x, min(k1, n), block_size)

  support = _expanded_support(indices, k1, n)
  rows = np.repeat(np.arange(n), np.diff(support.indptr))
  dist = 2.0 - 2.0 * _pair_dots(x, rows, support.indices)  # float32, like the kNN
  v = sp.csr_matrix((_row_softmax(support, -dist), support.indices, support.indptr),
                    shape=(n, n))

  if k2 > 1:
    v = _list_prefix_matrix(indices, min(k2, indices.shape[1]), n).astype(np.float64) @ v
    v = v.tocsr()
    v.data /= min(k2, indices.shape[1])
    v.sum_duplicates()

  v.eliminate_zeros()  # V is internal; only positive weights take part
  return _distance_from_support(v)
