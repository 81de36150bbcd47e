"""k-reciprocal Jaccard distance between training features (kNN in JAX, the rest numpy/scipy).

This is the distance Cluster Contrast clusters with every epoch (docs/algorithms.md, section 5).
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

Only the kNN search touches dense (block x N) arrays (a jitted matmul + ``lax.top_k`` per block
on the default JAX device); everything after it is sparse, O(N k) memory. The result is a
``scipy.sparse.csr_matrix`` whose **absent entries mean distance 1.0** (the pair shares no
support) and whose diagonal is always stored explicitly. With ``max_distance`` (DBSCAN's eps)
only the pairs within it are stored and computed without any O(N^2) pass: a few dozen entries
per row instead of thousands, which is all DBSCAN needs.

The steps are public building blocks, shared with the camera-aware variant (``ca_jaccard.py``)
and InfoMap: ``check_features``, ``map_row_blocks`` (the blocked kNN driver), ``pair_dots``,
``list_prefix_matrix``, ``reciprocal_sets``, ``softmax_weights`` (step 4), ``query_expansion``
(step 5), ``distance_from_support`` (step 6) and ``jaccard_from_knn`` (steps 2-6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

__all__ = [
  "check_features",
  "distance_from_support",
  "jaccard_distance",
  "jaccard_from_knn",
  "knn",
  "list_prefix_matrix",
  "map_row_blocks",
  "pair_dots",
  "query_expansion",
  "reciprocal_sets",
  "softmax_weights",
]

# Upper bound on the number of (row, column) candidate pairs handled in one vectorised step of
# the min-sum (and on the cells of its dense block buffer): a few hundred MB of temporaries.
_PAIR_BUDGET = 1 << 22
# Cells of the reusable float64 accumulator of the thresholded min-sum (never scanned, only
# read and reset where touched): small enough to stay in cache, at least 16 rows of N.
_HALF_BUFFER = 1 << 17
_HALF_MIN_ROWS = 16
# Upper bound on the number of float32 elements gathered at once for pairwise dot products
# (small chunks stay in cache: batched matmul over 1024 pairs of 2048-d rows is ~3x einsum).
_GATHER_BUDGET = 1 << 21


def check_features(features: np.ndarray) -> np.ndarray:
  """(N, D) features as a C-contiguous float32 array; ValueError if empty, not 2-D or not finite."""
  x = np.ascontiguousarray(features, dtype=np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf.")
  return x


_KNN_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.partial(jax.jit, static_argnames=("block", "k", "dtype"))
def _knn_block(
  x: jax.Array, start: jax.Array, *, block: int, k: int, dtype: str
) -> tuple[jax.Array, jax.Array]:
  """Top-``k`` of ``-(2 - 2 x_q.x_j)`` for the ``block`` query rows starting at ``start``.

  ``lax.dynamic_slice`` clamps ``start`` to ``N - block``: the caller asks for the last, partial
  block with the same fixed shape and keeps only its tail. ``lax.top_k`` orders equal values by
  increasing index, which is the tie-break of ``knn``. ``2 s - 2`` is the exact negation of
  ``2 - 2 s`` in IEEE arithmetic, so the order is the one of the float32 distance itself.
  """
  query = jax.lax.dynamic_slice_in_dim(x, start, block)
  low = _KNN_DTYPES[dtype]
  if low is None:
    sims = jnp.matmul(query, x.T, precision=jax.lax.Precision.HIGHEST)
  else:
    sims = jnp.matmul(query.astype(low), x.astype(low).T, preferred_element_type=jnp.float32)
  return jax.lax.top_k(2.0 * sims - 2.0, k)


def map_row_blocks(
  n: int,
  block: int,
  launch: Callable[[jax.Array], tuple[jax.Array, ...]],
  dtypes: tuple[npt.DTypeLike, ...],
) -> list[np.ndarray]:
  """Runs a jitted per-block function over all N rows and gathers its outputs on the host.

  ``launch(first_row)`` (``first_row`` a device int32 scalar) must return a tuple of device
  arrays whose leading dimension is ``block``, for the rows ``first_row .. first_row + block``;
  the last block is clamped to ``N - block`` by the caller's ``dynamic_slice`` and only its
  tail is kept. Block ``b + 1`` is dispatched before block ``b`` is fetched, so the host copy
  overlaps the device work. Returns one (N, ...) array per output, cast to ``dtypes``.
  """
  outs: list[np.ndarray] | None = None
  pending = None
  for start in range(0, n + block, block):
    if start < n:
      first_row = jax.device_put(np.int32(min(start, n - block)))
      launched = (start, launch(first_row))
    if pending is not None:
      first, arrays = pending
      stop = min(first + block, n)
      skip = block - (stop - first)  # rows of a clamped last block that belong to the previous
      arrays = jax.device_get(arrays)
      if outs is None:
        outs = [np.empty((n,) + a.shape[1:], dtype=t) for a, t in zip(arrays, dtypes)]
      for out, a in zip(outs, arrays):
        out[first:stop] = a[skip:]
    pending = launched if start < n else None
  assert outs is not None  # n >= 1: at least one block
  return outs


def knn(
  features: np.ndarray, k: int, block_size: int = 1024, *, knn_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest neighbours of every row among all rows (the row itself included).

  The distance is ``2 - 2 x_i.x_j`` (the squared L2 distance of unit vectors), computed in
  float32 on the default JAX device, one jitted ``(block_size x D) @ (D x N)`` matmul plus
  ``lax.top_k`` per block, so at most ``block_size x N`` distances exist at once.

  Tie-break (deterministic, documented): each row is ordered by the float32 distance value, and
  equal values by increasing column index, i.e. exactly what a stable argsort of the row gives.
  An exact duplicate of ``i`` with a smaller index therefore comes before ``i`` itself.

  Args:
    features: (N, D) features, assumed L2-normalised (not checked).
    k: number of neighbours to return, ``1 <= k <= N``.
    block_size: number of query rows per matmul block (clipped to N).
    knn_dtype: ``"float32"`` (exact, the default), or ``"bfloat16"`` / ``"float16"`` for the
      matmul only: the top ``2k`` candidates of each row (at most N) are then re-ranked by their
      float32 distance with the same tie-break. Faster on accelerators, **not exact**: a true
      neighbour that the low-precision product pushes out of the candidates is lost.

  Returns:
    ``(indices, distances)``: int64 (N, k) and float32 (N, k), row ``i`` sorted as above.
  """
  x = check_features(features)
  n = x.shape[0]
  k = int(k)
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, N={n}], got {k}.")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  if knn_dtype not in _KNN_DTYPES:
    raise ValueError(f"knn_dtype must be one of {sorted(_KNN_DTYPES)}, got {knn_dtype!r}.")
  block = min(int(block_size), n)
  exact = knn_dtype == "float32"
  width = k if exact else min(2 * k, n)
  x_dev = jax.device_put(x)
  out_key, out_idx = map_row_blocks(
    n,
    block,
    functools.partial(_knn_block, x_dev, block=block, k=width, dtype=knn_dtype),
    (np.float32, np.int64),
  )
  del x_dev
  if exact:
    return out_idx, np.float32(0.0) - out_key  # 0 - key: +0.0, never -0.0, for self
  # Low precision: re-rank the candidates by their float32 distance (same tie-break).
  rows = np.repeat(np.arange(n), width)
  dist = (2.0 - 2.0 * pair_dots(x, rows, out_idx.ravel())).reshape(n, width)
  order = np.lexsort((out_idx, dist), axis=-1)[:, :k]
  return (
    np.take_along_axis(out_idx, order, axis=1),
    np.take_along_axis(dist, order, axis=1).astype(np.float32),
  )


def list_prefix_matrix(indices: np.ndarray, length: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix with row i = the first ``length`` entries of kNN list i."""
  cols = np.ascontiguousarray(indices[:, :length]).ravel()
  indptr = np.arange(0, n * length + 1, length, dtype=np.int64)
  mat = sp.csr_matrix((np.ones(cols.size, dtype=np.int32), cols, indptr), shape=(n, n))
  mat.sort_indices()
  return mat


def reciprocal_sets(indices: np.ndarray, length: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix with row i = {j in first `length` of i's list : i in first `length` of j's}."""
  forward = list_prefix_matrix(indices, length, n)
  mutual = forward.multiply(forward.T).tocsr()
  mutual.sort_indices()
  return mutual


def _expanded_support(indices: np.ndarray, k1: int, n: int) -> sp.csr_matrix:
  """CSR 0/1 matrix whose row i is the expanded set E(i) (steps 2-3)."""
  k_list = indices.shape[1]
  k_half = int(np.round(k1 / 2))  # numpy rounds half to even: 15 for k1 = 30
  r_full = reciprocal_sets(indices, min(k1 + 1, k_list), n)
  r_half = reciprocal_sets(indices, min(k_half + 1, k_list), n)
  half_size = np.diff(r_half.indptr)
  # overlap[i, c] = |Rk(i, k1) & Rk(c, k')|, kept only where c is in Rk(i, k1).
  overlap = r_full.multiply(r_full @ r_half.T).tocoo()
  # Strict "> 2/3 |Rk(c, k')|" in integers (same as the float test `c > 2/3 * s` for s <= 2000).
  keep = 3 * overlap.data.astype(np.int64) > 2 * half_size[overlap.col]
  select = sp.csr_matrix(
    (np.ones(int(keep.sum()), dtype=np.int32), (overlap.row[keep], overlap.col[keep])), shape=(n, n)
  )
  support = (r_full + select @ r_half).tocsr()
  support.sum_duplicates()  # canonical: sorted column indices, one entry per pair
  support.data[:] = 1
  return support


def pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """float32 x[rows[p]].x[cols[p]] for every pair p, gathered in bounded chunks."""
  out = np.empty(rows.size, dtype=np.float32)
  step = max(1, _GATHER_BUDGET // max(1, x.shape[1]))
  for s in range(0, rows.size, step):
    e = min(s + step, rows.size)
    out[s:e] = np.matmul(x[rows[s:e]][:, None, :], x[cols[s:e]][:, :, None])[:, 0, 0]
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


def _distance_values(m: np.ndarray) -> np.ndarray:
  """Step 6 on the min-sums: float32 ``max(0, 1 - m / (2 - m))``."""
  return np.maximum(1.0 - m / (2.0 - m), 0.0).astype(np.float32)


def distance_from_support(v: sp.csr_matrix, max_distance: float | None = None) -> sp.csr_matrix:
  """Steps 6 and storage: the Jaccard distance CSR from the (query-expanded) V.

  For each row i, ``m[i, j] = sum_k min(v[i, k], v[j, k])`` runs over the k shared by rows i
  and j: for every nonzero (i, k) of ``v`` the partners j are the nonzeros of column k (CSC).
  Every pair sums its terms sequentially in increasing k, so ``m[i, j]`` and ``m[j, i]`` are
  bitwise equal and the two storage modes below store bitwise-equal values.

  * ``max_distance is None``: all pairs with ``d < 1``. Rows are processed in blocks whose
    (i, j, min) terms are summed with ``np.bincount`` into a dense (block x N) float64 buffer;
    its nonzeros come out in canonical CSR order. Time O(terms + N^2), memory O(budget).
  * otherwise only the pairs with ``d < 1`` and ``float32(d) <= float32(max_distance)``, plus
    the diagonal. Only the terms with ``j >= i`` are generated (half of them); they are summed
    with ``np.add.at`` into a reusable zero buffer that is read back and reset at the touched
    cells only, so the time is O(terms) with no O(N^2) pass; the few kept pairs are mirrored.

  All stored values of ``v`` must be positive (softmax weights are).
  """
  n = v.shape[0]
  vc = v.tocsc()
  vc.sort_indices()
  vc_indices = vc.indices.astype(np.int64)
  half = max_distance is not None
  if half:
    # CSC position of every CSR entry (i, k): column k lists i there, then its partners j > i.
    slot = sp.csr_matrix(
      (np.arange(1, v.nnz + 1, dtype=np.int64), v.indices, v.indptr), shape=v.shape
    ).tocsc()
    slot.sort_indices()
    first_all = np.empty(v.nnz, dtype=np.int64)
    first_all[slot.data - 1] = np.arange(v.nnz, dtype=np.int64)
    del slot
    reps_all = vc.indptr[1:].astype(np.int64)[v.indices] - first_all
    limit = np.float32(max_distance)
    # d(m) decreases with m: every pair with float32(d) <= limit has m >= m_min (a slightly
    # loose bound, one float32 step above limit); the exact test is made on the hits.
    loose = min(float(np.nextafter(limit, np.float32(np.inf))), 1.0)
    m_min = 2.0 * (1.0 - loose) / (2.0 - loose) - 1e-9
  else:
    first_all = vc.indptr[:-1].astype(np.int64)[v.indices]
    reps_all = np.diff(vc.indptr).astype(np.int64)[v.indices]
  cum_entry = np.concatenate(([0], np.cumsum(reps_all)))
  cum_terms = cum_entry[v.indptr[1:]]  # terms of rows 0..i
  row_terms = np.diff(cum_terms, prepend=0)
  max_rows = max(_HALF_MIN_ROWS, _HALF_BUFFER // n) if half else max(1, _PAIR_BUDGET // n)
  buf = np.zeros(max_rows * n if half else 0)  # float64 zeros, reset after every block
  index_dtype: type[np.signedinteger] = np.int32 if n < 2**31 else np.int64

  out_rows, out_cols, out_data = [], [], []
  start = 0
  while start < n:
    base = cum_terms[start - 1] if start > 0 else 0
    stop = int(np.searchsorted(cum_terms, base + _PAIR_BUDGET, side="right"))
    stop = min(max(stop, start + 1), start + max_rows, n)
    lo, hi = v.indptr[start], v.indptr[stop]
    b = stop - start
    # Entry e of v (row i, column k, value v_ik) meets the nonzeros of column k from first_e on.
    reps = reps_all[lo:hi]
    ends = np.cumsum(reps)
    total = int(ends[-1]) if ends.size else 0
    partner = np.repeat(first_all[lo:hi] - (ends - reps), reps)
    partner += np.arange(total, dtype=np.int64)  # the partner's position in the CSC arrays
    mins = vc.data[partner]
    np.minimum(mins, np.repeat(v.data[lo:hi], reps), out=mins)
    code = vc_indices[partner]  # partner j, plus (local row) * n below
    del partner
    code += np.repeat(np.arange(b, dtype=np.int64) * n, row_terms[start:stop])
    if half:
      diag_code = np.arange(b, dtype=np.int64) * (n + 1) + start
      np.add.at(buf, code, mins)
      m_code = buf[code]
      sel = np.flatnonzero(m_code >= m_min)
      m_diag = buf[diag_code]  # 0 for an empty V row: d = 1, still stored
      buf[code] = 0.0  # all zeros again
      hits, at = np.unique(np.concatenate((diag_code, code[sel])), return_index=True)
      m = np.concatenate((m_diag, m_code[sel]))[at]
      d = _distance_values(m)
      rows, cols = np.divmod(hits, n)
      keep = ((d <= limit) & (d < 1.0)) | (cols == rows + start)
      rows, cols, d = rows[keep], cols[keep], d[keep]
    else:
      dense = np.bincount(code, weights=mins, minlength=b * n).reshape(b, n)
      rows, cols = np.nonzero(dense)  # row-major: canonical order
      d = _distance_values(dense[rows, cols])
      keep = (d < 1.0) | (cols == rows + start)
      rows, cols, d = rows[keep], cols[keep], d[keep]
      missing = np.flatnonzero(dense[np.arange(b), np.arange(start, stop)] == 0)
      if missing.size:  # empty V row: no term, not even i-i; store its diagonal 1.0
        rows = np.concatenate((rows, missing))
        cols = np.concatenate((cols, missing + start))
        d = np.concatenate((d, np.ones(missing.size, dtype=np.float32)))
        order = np.lexsort((cols, rows))
        rows, cols, d = rows[order], cols[order], d[order]
      del dense
    out_rows.append(
      rows.astype(index_dtype) + index_dtype(start) if half else np.bincount(rows, minlength=b)
    )  # full mode: row counts
    out_cols.append(cols.astype(index_dtype))
    out_data.append(d)
    start = stop

  cols, data = np.concatenate(out_cols), np.concatenate(out_data)
  if half:  # mirror the strict upper part, then sort
    rows = np.concatenate(out_rows)
    upper = cols > rows
    rows, cols = np.concatenate((rows, cols[upper])), np.concatenate((cols, rows[upper]))
    data = np.concatenate((data, data[upper]))
    order = np.lexsort((cols, rows))
    cols, data = cols[order], data[order]
    counts = np.bincount(rows, minlength=n)
  else:
    counts = np.concatenate(out_rows)
  indptr = np.zeros(n + 1, dtype=np.int64)
  np.cumsum(counts, out=indptr[1:])
  out = sp.csr_matrix((data, cols, indptr), shape=(n, n))
  out.has_sorted_indices = True
  return out


def _support_logits(
  x: np.ndarray, support: sp.csr_matrix, indices: np.ndarray, distances: np.ndarray
) -> np.ndarray:
  """``-(2 - 2 x_i.x_j)`` for every support entry, aligned with ``support.data``.

  Pairs in i's kNN list reuse the kNN distance (the value the list was sorted by); the few
  others (reached only through the expansion) get a float32 dot product.
  """
  n = indices.shape[0]
  rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(support.indptr))
  code = rows * n + support.indices
  list_code = (np.arange(n, dtype=np.int64)[:, None] * n + indices).ravel()
  order = np.argsort(list_code, kind="stable")
  at = np.minimum(np.searchsorted(list_code, code, sorter=order), list_code.size - 1)
  found = list_code[order[at]] == code
  dist = np.empty(code.size, dtype=np.float32)
  dist[found] = distances.ravel()[order[at[found]]]
  rest = ~found
  dist[rest] = 2.0 - 2.0 * pair_dots(x, rows[rest], support.indices[rest])
  return -dist


def softmax_weights(
  x: np.ndarray, support: sp.csr_matrix, indices: np.ndarray, distances: np.ndarray
) -> sp.csr_matrix:
  """Step 4: float64 CSR ``V`` with row i = softmax of ``-(2 - 2 x_i.x_j)`` over its support.

  ``indices``/``distances`` are kNN-style lists (row i holds neighbours of i and their float32
  distances); support pairs found there reuse that distance, the others get a dot product.
  """
  n = x.shape[0]
  logits = _support_logits(x, support, indices, distances)
  return sp.csr_matrix(
    (_row_softmax(support, logits), support.indices, support.indptr), shape=(n, n)
  )


def query_expansion(v: sp.csr_matrix, selector: sp.csr_matrix, count: int) -> sp.csr_matrix:
  """Step 5: ``V_qe[i] = (sum_j selector[i, j] V[j]) / count`` (float64, canonical CSR).

  ``selector`` holds the (integer) multiplicity of every row ``j`` that row ``i`` averages.
  """
  v = selector.astype(np.float64) @ v
  v = v.tocsr()
  v.data /= count
  v.sum_duplicates()
  return v


def jaccard_distance(
  features: np.ndarray,
  k1: int = 30,
  k2: int = 6,
  *,
  max_distance: float | None = None,
  block_size: int = 1024,
  knn_dtype: str = "float32",
) -> sp.csr_matrix:
  """k-reciprocal Jaccard distance of Cluster Contrast, as a sparse N x N float32 matrix.

  Args:
    features: (N, D) L2-normalised features (cast to float32).
    k1: length of the kNN list (self included) and of the k-reciprocal neighbourhood. When
      ``k1 > N`` the list holds all N points.
    k2: query-expansion size; ``k2 == 1`` disables query expansion (as in the reference).
    max_distance: ``None`` stores every pair with distance < 1. A number stores only the pairs
      whose float32 distance is ``<= float32(max_distance)`` (plus the diagonal): with
      ``max_distance=eps`` this is everything DBSCAN looks at (its neighbours are exactly the
      stored entries ``<= eps``, whether it compares in float32 or float64), typically a few
      dozen entries per row instead of thousands, and it is computed without any O(N^2) pass.
      Stored values are bitwise equal to those of ``max_distance=None``.
    block_size: rows per kNN matmul block (see ``knn``, including its tie-break).
    knn_dtype: matmul dtype of the kNN (see ``knn``); only ``"float32"`` is exact.

  Returns:
    ``scipy.sparse.csr_matrix`` (N, N) float32, symmetric, canonical (sorted indices, no
    duplicates). Stored: every pair with distance < 1 (or ``<= max_distance``), and the whole
    diagonal (explicitly, even where its value is 0; it is 1 only for a point whose V row is
    empty, which needs many exact duplicates). **Absent entries mean distance 1.0** (or, with
    ``max_distance``, "farther than ``max_distance``"). Callers must not call
    ``eliminate_zeros`` on it: that would drop the diagonal zeros and turn them into 1.0.
  """
  x = check_features(features)
  n = x.shape[0]
  k1, k2 = int(k1), int(k2)
  if k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}.")
  if max_distance is not None and not max_distance >= 0:
    raise ValueError(f"max_distance must be None or >= 0, got {max_distance}.")
  indices, distances = knn(x, min(k1, n), block_size, knn_dtype=knn_dtype)
  return jaccard_from_knn(x, indices, distances, k1, k2, max_distance)


def jaccard_from_knn(
  x: np.ndarray,
  indices: np.ndarray,
  distances: np.ndarray,
  k1: int,
  k2: int,
  max_distance: float | None,
) -> sp.csr_matrix:
  """Steps 2-6 from the kNN lists (``jaccard_distance`` minus its kNN; benchmarks time it)."""
  n = x.shape[0]
  support = _expanded_support(indices, k1, n)
  v = softmax_weights(x, support, indices, distances)
  if k2 > 1:
    width = min(k2, indices.shape[1])
    v = query_expansion(v, list_prefix_matrix(indices, width, n), width)
  v.eliminate_zeros()  # V is internal; only positive weights take part
  return distance_from_support(v, max_distance)
