"""Re-ID ranking metrics: mAP, CMC (docs/algorithms.md section 7) and mINP (section 11), numpy only.

Protocol: every query is ranked against the whole gallery by increasing distance; gallery
entries with the query's identity *and* camera are removed from its ranking; queries left
without any correct match are skipped. AP is the non-interpolated average precision that
``sklearn.metrics.average_precision_score(matches, -distance)`` returns, tied distances
included (tied entries share one threshold: each correct entry scores the precision at the end
of its tie group). CMC(k) is the fraction of queries whose first correct match is within the
first k remaining entries; the position comes from a stable argsort, so ties are broken by
gallery index (the reference's unstable argsort leaves them arbitrary).

mINP (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI
2021) is the mean over the same queries of INP = (number of correct matches) / (rank of the
last correct match), the rank counted among the remaining entries. Ties are treated as for
AP: the last correct match ranks at the end of its tie group, i.e. its rank is the number of
remaining entries at a distance <= its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["evaluate_ranking", "pairwise_distance"]

# Elements (queries x gallery) handled at once; each costs about 40 bytes of temporaries.
_BLOCK_ELEMENTS = 1 << 22


def pairwise_distance(
  query_features: np.ndarray, gallery_features: np.ndarray, *, block_size: int = 4096
) -> np.ndarray:
  """Squared Euclidean distances ``|q|^2 + |g|^2 - 2 q.g`` as a (Q, G) float32 array.

  For L2-normalised features this is ``2 - 2 cos``. Computed in float32, ``block_size`` query
  rows at a time; values are kept as computed (not clipped), so rounding can leave tiny
  negative values (around -1e-7) where q == g. Rankings are unaffected.
  """
  q = np.asarray(query_features, dtype=np.float32)
  g = np.asarray(gallery_features, dtype=np.float32)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"expected (Q, D) and (G, D) features, got {q.shape} and {g.shape}.")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  g_sq = np.einsum("ij,ij->i", g, g)
  out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
  for s in range(0, q.shape[0], block_size):
    block = q[s : s + block_size]
    d = block @ g.T
    d *= -2.0
    d += np.einsum("ij,ij->i", block, block)[:, None]
    d += g_sq[None, :]
    out[s : s + block_size] = d
  return out


def _rank_block(dist, q_identities, q_cameras, gallery_identities, gallery_cameras):
  """AP, first-match position (1-based, among kept entries) and INP for a block of queries.

  Returns ``(ap, first, inp, has_match)``; the first three are meaningful where ``has_match``.
  """
  order = np.argsort(dist, axis=1, kind="stable")
  sorted_dist = np.take_along_axis(dist, order, axis=1)
  same_identity = gallery_identities[order] == q_identities[:, None]
  kept = ~(same_identity & (gallery_cameras[order] == q_cameras[:, None]))
  positive = same_identity & kept
  cum_pos = np.cumsum(positive, axis=1)
  cum_kept = np.cumsum(kept, axis=1)
  num_pos = cum_pos[:, -1]
  has_match = num_pos > 0

  # Last position of every tie group (equal distances, removed entries included: they add
  # nothing to either count).
  b, g = dist.shape
  is_last = np.ones((b, g), dtype=bool)
  is_last[:, :-1] = sorted_dist[:, 1:] != sorted_dist[:, :-1]
  last = np.where(is_last, np.arange(g)[None, :], g)
  last = np.minimum.accumulate(last[:, ::-1], axis=1)[:, ::-1]
  prec_at_end = np.take_along_axis(cum_pos, last, axis=1) / np.maximum(
    np.take_along_axis(cum_kept, last, axis=1), 1
  )
  ap = np.where(positive, prec_at_end, 0.0).sum(axis=1) / np.maximum(num_pos, 1)

  rows = np.arange(b)
  first_pos = np.argmax(positive, axis=1)
  first = cum_kept[rows, first_pos]

  # The last correct match ranks at the end of its tie group, as for AP.
  last_pos = g - 1 - np.argmax(positive[:, ::-1], axis=1)
  last_rank = cum_kept[rows, last[rows, last_pos]]
  inp = num_pos / np.maximum(last_rank, 1)
  return ap, first, inp, has_match


def evaluate_ranking(
  distmat: np.ndarray,
  query_identities: np.ndarray,
  gallery_identities: np.ndarray,
  query_cameras: np.ndarray,
  gallery_cameras: np.ndarray,
  topk: Sequence[int] = (1, 5, 10),
  *,
  block_elements: int = _BLOCK_ELEMENTS,
) -> dict[str, float]:
  """mAP, CMC and mINP of a (Q, G) distance matrix under the protocol in the module docstring.

  Args:
    distmat: (Q, G) distances, smaller = more similar (e.g. ``pairwise_distance``).
    query_identities, gallery_identities: (Q,) and (G,) identities, compared for equality.
    query_cameras, gallery_cameras: (Q,) and (G,) cameras, compared for equality.
    topk: the CMC ranks to report.
    block_elements: queries are processed in blocks of about this many distances, so memory
      stays bounded for large galleries.

  Returns:
    ``{"mAP": ..., "mINP": ..., "rank1": ..., "rank5": ..., "rank10": ...}`` (one
    ``rank{k}`` per k in ``topk``), floats in [0, 1], averaged over the queries that have a
    valid match.

  Raises:
    ValueError: on mismatched shapes, or when no query has any valid match.
  """
  dist = np.asarray(distmat)
  q_identities = np.asarray(query_identities).ravel()
  g_identities = np.asarray(gallery_identities).ravel()
  q_cameras, g_cameras = np.asarray(query_cameras).ravel(), np.asarray(gallery_cameras).ravel()
  if dist.ndim != 2 or dist.shape != (q_identities.size, g_identities.size):
    raise ValueError(
      f"distmat shape {dist.shape} does not match {q_identities.size} queries "
      f"and {g_identities.size} gallery entries."
    )
  if q_cameras.size != q_identities.size or g_cameras.size != g_identities.size:
    raise ValueError("camera arrays must match the identity arrays in length.")
  topk = tuple(int(k) for k in topk)
  if any(k < 1 for k in topk):
    raise ValueError(f"topk values must be >= 1, got {topk}.")
  if np.isnan(dist).any():
    raise ValueError("distmat contains NaN.")

  num_q, num_g = dist.shape
  step = max(1, int(block_elements) // max(1, num_g))
  aps, firsts, inps = [], [], []
  for s in range(0, num_q, step):
    e = min(s + step, num_q)
    ap, first, inp, ok = _rank_block(
      dist[s:e], q_identities[s:e], q_cameras[s:e], g_identities, g_cameras
    )
    aps.append(ap[ok])
    firsts.append(first[ok])
    inps.append(inp[ok])
  ap = np.concatenate(aps) if aps else np.zeros(0)
  first = np.concatenate(firsts) if firsts else np.zeros(0, dtype=np.int64)
  inp = np.concatenate(inps) if inps else np.zeros(0)
  if ap.size == 0:
    raise ValueError(
      "no query has a valid match in the gallery (after removing same-identity same-camera "
      "entries); mAP, CMC and mINP are undefined."
    )
  out = {"mAP": float(ap.mean()), "mINP": float(inp.mean())}
  for k in topk:
    out[f"rank{k}"] = float(np.mean(first <= k))
  return out
