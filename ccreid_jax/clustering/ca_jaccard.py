"""Camera-aware Jaccard distance (CA-Jaccard), sparse and exact (docs/algorithms.md section 9).

Source: Chen et al., "CA-Jaccard: Camera-aware Jaccard Distance for Person Re-identification",
CVPR 2024; code ``chenyiyuu/CA-Jaccard``, ``caj/utils/caj_rerank.py`` (``--ckrnns --clqe``).
It is the k-reciprocal Jaccard distance of ``jaccard.py`` (docs/algorithms.md section 5) with
camera-aware neighbour sets and query expansion. Given L2-normalised features ``x`` (N x D), one
camera per row, and the float32 distance ``d(i, j) = 2 - 2 x_i.x_j``:

1. Ranking lists of ``i`` over all N points. ``S(i)``: the points of i's camera (i included),
   ``O(i)``: all other points, each ordered by ``d(i, .)``, equal distances by increasing index.
   The **intra-camera list** is ``S(i)`` followed by ``O(i)``; the **inter-camera list** is
   ``O(i)`` followed by ``S(i)`` (the reference adds 999 to the distance of the pushed-back
   part).
2. CKRNNs: ``Rintra(i)`` = the ``j`` among the first ``k1_intra + 1`` entries of i's intra
   list whose own intra list starts (first ``k1_intra + 1`` entries) with ``i`` somewhere;
   ``Rinter(i)`` likewise on the inter lists with ``k1_inter``. The support of row i is
   ``Rintra(i) | Rinter(i)``; there is no 2/3 expansion step.
3. ``V[i, j] = softmax_{j in support(i)}(-d(i, j))``, zero elsewhere.
4. CLQE: ``V_qe[i] = (sum of V[j] over the first k2_intra entries j of i's intra list and the
   first k2_inter entries of its inter list) / (k2_intra + k2_inter)``. The two index lists are
   concatenated, not united: a row that appears in both counts twice (the reference appends them
   and takes ``np.mean``). They are disjoint unless a camera is small (below).
5. ``d_ca(i, j) = max(0, 1 - m / (2 - m))`` with ``m = sum_k min(V_qe[i, k], V_qe[j, k])``.

Only the kNN search touches dense (block x N) arrays: one jitted matmul per block of query rows,
then two ``lax.top_k``, one with the other cameras masked out (the head of ``S(i)``) and one with
i's camera masked out (the head of ``O(i)``). Everything after it reuses the sparse machinery of
``jaccard.py``, O(N k) memory.

Edge cases (all follow from the lists of step 1, as in the reference):

* A camera with fewer images than ``k1_intra + 1`` (or than ``k2_intra``): its intra lists run
  on into the other cameras, nearest first. Such an entry ``j`` is intra-reciprocal only if ``i``
  is in the head of ``j``'s own intra list, i.e. only if ``j``'s camera is small too; CLQE does
  average over it.
* A point with fewer other-camera images than ``k1_inter + 1`` (or ``k2_inter``): its inter list
  runs on into its own camera, normally starting with itself (``d = 0``), so ``i`` is in its own
  ``Rinter``, and same-camera points can be inter-reciprocal (they have the same number of
  other-camera images). In CLQE such rows (``i`` itself included) can count twice.
* One camera only: ``O(i)`` is empty, so intra and inter lists are both the plain kNN list.
  The support is the k-reciprocal set on that list with ``k = max(k1_intra, k1_inter)`` (the
  smaller k's set lies inside it), and CLQE averages the first ``k2_intra`` and the first
  ``k2_inter`` kNN entries with multiplicity: the first ``min(k2_intra, k2_inter)`` rows count
  twice. It is not an error.
* Fewer than ``k + 1`` points in all (``N < k1_inter + 1`` etc.): the lists hold all N points.
  (The reference fails there: ``np.argpartition`` needs ``k + 2 <= N``.)
* Ties: equal distances are ordered by increasing index (``lax.top_k``'s order, as ``knn``).
  The reference's ``np.argpartition`` is not stable, so its order among exactly equal distances
  is unspecified. Its pushed-back part is ordered by ``d + 999`` in float64, which equals the
  order of ``d`` unless two distances closer than ~1e-13 merge. When ``k2 > k1 + 2`` the
  reference reads entries beyond its partially sorted prefix; here the lists are always fully
  ordered.

Numerics: the weights, the expansion and the min-sum are float64 (the reference uses float32),
the result float32; differences to the reference are of float32 rounding size (~1e-7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ccreid_jax.clustering import jaccard as jaccard_lib

__all__ = ["ca_jaccard_distance", "ca_jaccard_from_lists", "camera_ranking_lists", "check_cameras"]


@functools.partial(jax.jit, static_argnames=("block", "k_same", "k_other"))
def _camera_knn_block(
  x: jax.Array, cameras: jax.Array, start: jax.Array, *, block: int, k_same: int, k_other: int
) -> tuple[jax.Array, ...]:
  """Heads of ``S(i)`` and ``O(i)`` for the ``block`` query rows starting at ``start``.

  Returns ``(same_key, same_idx, other_key, other_idx)`` with ``key = 2 x_i.x_j - 2 = -d``,
  each top-``k`` ordered by decreasing key, equal keys by increasing index. Masked columns get
  ``-inf`` and come last; the caller never reads them. ``start`` is clamped by
  ``dynamic_slice`` to ``N - block``, as ``jaccard.map_row_blocks`` expects (and as ``knn``
  does).
  """
  query = jax.lax.dynamic_slice_in_dim(x, start, block)
  query_cameras = jax.lax.dynamic_slice_in_dim(cameras, start, block)
  key = 2.0 * jnp.matmul(query, x.T, precision=jax.lax.Precision.HIGHEST) - 2.0
  same = query_cameras[:, None] == cameras[None, :]
  masked = jnp.float32(-jnp.inf)
  same_key, same_idx = jax.lax.top_k(jnp.where(same, key, masked), k_same)
  other_key, other_idx = jax.lax.top_k(jnp.where(same, masked, key), k_other)
  return same_key, same_idx, other_key, other_idx


def check_cameras(cameras, n: int) -> np.ndarray:
  """Cameras as consecutive int32 codes 0..C-1 (any integer labels are accepted)."""
  cameras = np.asarray(cameras)
  if cameras.shape != (n,):
    raise ValueError(
      f"cameras must be a 1-D array with one camera per feature row "
      f"(shape ({n},)), got shape {cameras.shape}."
    )
  if not np.issubdtype(cameras.dtype, np.integer):
    raise ValueError(f"cameras must be integers, got dtype {cameras.dtype}.")
  return np.unique(cameras, return_inverse=True)[1].reshape(n).astype(np.int32)


def camera_ranking_lists(
  x: np.ndarray, codes: np.ndarray, intra_len: int, inter_len: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The first ``intra_len`` / ``inter_len`` entries of every intra / inter list (step 1).

  Returns ``(intra_idx, intra_dist, inter_idx, inter_dist)``: int64 and float32 arrays of shape
  (N, intra_len) and (N, inter_len); ``*_dist`` is the float32 ``d`` of each entry.
  """
  n = x.shape[0]
  size = np.bincount(codes)[codes]  # images in the row's camera
  others = n - size
  # Heads of S(i) and O(i) that the lists use: a list runs on into its second part only
  # when its first part is shorter than the list.
  k_same = int(np.max(np.minimum(size, np.maximum(intra_len, inter_len - others))))
  k_other = int(np.max(np.minimum(others, np.maximum(inter_len, intra_len - size))))
  k_same, k_other = max(k_same, 1), max(k_other, 1)  # one camera: O(i) is empty, unused
  block = min(int(block_size), n)
  x_dev = jax.device_put(x)
  cameras_dev = jax.device_put(codes)
  same_key, same_idx, other_key, other_idx = jaccard_lib.map_row_blocks(
    n,
    block,
    functools.partial(
      _camera_knn_block, x_dev, cameras_dev, block=block, k_same=k_same, k_other=k_other
    ),
    (np.float32, np.int64, np.float32, np.int64),
  )
  del x_dev, cameras_dev
  same_dist = np.float32(0.0) - same_key  # 0 - key: +0.0, never -0.0, as in knn
  other_dist = np.float32(0.0) - other_key

  intra_idx = np.empty((n, intra_len), dtype=np.int64)
  inter_idx = np.empty((n, inter_len), dtype=np.int64)
  intra_dist = np.empty((n, intra_len), dtype=np.float32)
  inter_dist = np.empty((n, inter_len), dtype=np.float32)
  for camera_size in np.unique(size):  # rows of equal camera size share the list layout
    rows = np.flatnonzero(size == camera_size)
    a = min(intra_len, int(camera_size))  # S(i) entries at the head of the intra list
    b = min(inter_len, n - int(camera_size))  # O(i) entries at the head of the inter list
    for out_idx, out_dist, first, second, split, length in (
      (intra_idx, intra_dist, (same_idx, same_dist), (other_idx, other_dist), a, intra_len),
      (inter_idx, inter_dist, (other_idx, other_dist), (same_idx, same_dist), b, inter_len),
    ):
      out_idx[rows, :split] = first[0][rows, :split]
      out_dist[rows, :split] = first[1][rows, :split]
      out_idx[rows, split:] = second[0][rows, : length - split]
      out_dist[rows, split:] = second[1][rows, : length - split]
  return intra_idx, intra_dist, inter_idx, inter_dist


def ca_jaccard_from_lists(
  x: np.ndarray,
  intra_idx: np.ndarray,
  intra_dist: np.ndarray,
  inter_idx: np.ndarray,
  inter_dist: np.ndarray,
  k1_intra: int,
  k1_inter: int,
  k2_intra: int,
  k2_inter: int,
  max_distance: float | None,
) -> sp.csr_matrix:
  """Steps 2-5 from the ranking lists (``ca_jaccard_distance`` minus its kNN search).

  The lists are ``camera_ranking_lists``'s output; the benchmarks time the two stages apart.
  """
  n = x.shape[0]
  support = (
    jaccard_lib.reciprocal_sets(intra_idx, min(k1_intra + 1, n), n)
    + jaccard_lib.reciprocal_sets(inter_idx, min(k1_inter + 1, n), n)
  ).tocsr()
  support.sum_duplicates()  # canonical: sorted column indices, one entry per pair
  support.data[:] = 1
  # Every support pair lies in one of i's two lists: all logits reuse the kNN distances.
  v = jaccard_lib.softmax_weights(
    x, support, np.hstack((intra_idx, inter_idx)), np.hstack((intra_dist, inter_dist))
  )
  width_intra, width_inter = min(k2_intra, n), min(k2_inter, n)
  selector = jaccard_lib.list_prefix_matrix(
    intra_idx, width_intra, n
  ) + jaccard_lib.list_prefix_matrix(inter_idx, width_inter, n)  # 2 where both lists
  v = jaccard_lib.query_expansion(v, selector, width_intra + width_inter)
  v.eliminate_zeros()  # V is internal; only positive weights take part
  return jaccard_lib.distance_from_support(v, max_distance)


def ca_jaccard_distance(
  features: np.ndarray,
  cameras: np.ndarray,
  *,
  k1_intra: int = 5,
  k1_inter: int = 20,
  k2_intra: int = 2,
  k2_inter: int = 4,
  max_distance: float | None = None,
  block_size: int = 1024,
) -> sp.csr_matrix:
  """Camera-aware Jaccard distance (CKRNNs + CLQE), as a sparse N x N float32 matrix.

  docs/algorithms.md section 9; Chen et al., CVPR 2024, ``chenyiyuu/CA-Jaccard``,
  ``caj/utils/caj_rerank.py``. The definition, the edge cases (small cameras, one camera,
  ``N`` below the list lengths) and the tie-break are in this module's docstring. The reference
  training uses ``k2_intra = k2_inter = 3`` in its first epoch (epoch 0) and the values given
  here (2 and 4 in its published commands) afterwards; that choice belongs to the caller.

  Args:
    features: (N, D) L2-normalised features (cast to float32).
    cameras: (N,) integer cameras, any values (only equality matters).
    k1_intra: k of the k-reciprocal set on the intra-camera lists (list head of
      ``k1_intra + 1`` entries, self included).
    k1_inter: k of the k-reciprocal set on the inter-camera lists.
    k2_intra: rows of the intra-camera list (self included) averaged by CLQE.
    k2_inter: rows of the inter-camera list averaged by CLQE.
    max_distance: as in ``jaccard_distance``: ``None`` stores every pair with distance < 1; a
      number stores only the pairs with float32 distance ``<= float32(max_distance)`` (plus the
      diagonal), bitwise equal to the corresponding entries of the full output.
    block_size: query rows per kNN matmul block.

  Returns:
    ``scipy.sparse.csr_matrix`` (N, N) float32 in the convention of ``jaccard_distance``:
    symmetric, canonical, diagonal always stored, **absent entries mean distance 1.0** (or,
    with ``max_distance``, "farther than ``max_distance``"). Do not ``eliminate_zeros`` it.

  Raises:
    ValueError: bad features (shape, NaN/inf), cameras not an integer (N,) array, a ``k`` below
      1, a negative ``max_distance`` or a non-positive ``block_size``.
  """
  x = jaccard_lib.check_features(features)
  n = x.shape[0]
  codes = check_cameras(cameras, n)
  ks = {"k1_intra": k1_intra, "k1_inter": k1_inter, "k2_intra": k2_intra, "k2_inter": k2_inter}
  ks = {name: int(value) for name, value in ks.items()}
  bad = {name: value for name, value in ks.items() if value < 1}
  if bad:
    raise ValueError(f"CA-Jaccard needs every k >= 1, got {bad}.")
  if max_distance is not None and not max_distance >= 0:
    raise ValueError(f"max_distance must be None or >= 0, got {max_distance}.")
  if int(block_size) < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  intra_len = min(max(ks["k1_intra"] + 1, ks["k2_intra"]), n)
  inter_len = min(max(ks["k1_inter"] + 1, ks["k2_inter"]), n)
  lists = camera_ranking_lists(x, codes, intra_len, inter_len, block_size)
  return ca_jaccard_from_lists(
    x,
    *lists,
    k1_intra=ks["k1_intra"],
    k1_inter=ks["k1_inter"],
    k2_intra=ks["k2_intra"],
    k2_inter=ks["k2_inter"],
    max_distance=max_distance,
  )
