"""InfoMap pseudo labels: the edge walk by hand, and exact partitions on unambiguous data."""

import infomap
import numpy as np
import pytest

from ccreid_jax import clustering
from ccreid_jax.clustering import infomap_edges, infomap_labels


def _angles(degrees):
  rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
  return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def _walk_by_hand(x, k, min_similarity):
  """Loop transcription of the rule: neighbours by decreasing cosine, self skipped, stop early."""
  sims = x @ x.T
  edges = []
  for i in range(len(x)):
    order = np.argsort(2.0 - 2.0 * sims[i], kind="stable")[:k]  # the kNN list
    order = order[np.argsort(-sims[i, order], kind="stable")]
    for j in order:
      if j == i:
        continue
      if sims[i, j] < min_similarity:
        break
      edges.append((i, int(j), float(sims[i, j])))
  return edges


def test_edge_walk_by_hand():
  # Unit vectors at these angles; point 6 is an exact copy of point 0 (so in row 6 the copy 0
  # comes before self: self is skipped, and the walk goes on past it).
  x = _angles([0, 20, 50, 70, 105, 180, 0])
  src, dst, w = infomap_edges(x, k=4, min_similarity=0.5)
  assert src.dtype == np.int64 and dst.dtype == np.int64 and w.dtype == np.float32
  got = {}
  for s, d, weight in zip(src, dst, w):
    got.setdefault(int(s), []).append(int(d))
    np.testing.assert_allclose(weight, x[s] @ x[d], rtol=0, atol=1e-6)
  # 0 (and its copy 6): self/copy at cos 1, then 20 deg (0.94), 50 deg (0.64); 70 deg (0.34)
  # would be the next one but k = 4 ends the list anyway.
  assert got[0] == [6, 1, 2]
  assert got[6] == [0, 1, 2]
  # 1 at 20 deg: 0 and 6 (0.94), 50 deg (0.87); the 4th entry (70 deg, 0.64) falls outside k.
  assert got[1] == [0, 6, 2]
  # 3 at 70 deg: 50 deg (0.94), 105 deg (0.82), 20 deg (0.64).
  assert got[3] == [2, 4, 1]
  # 5 at 180 deg: 105 deg (cos 75 deg = 0.26) is the nearest: the walk stops at once.
  assert 5 not in got
  # 4 at 105 deg: 70 deg (0.82), 50 deg (0.57), then 180 deg (0.26) stops the walk.
  assert got[4] == [3, 2]
  # Same edges as a literal loop transcription, also for other k and thresholds.
  for k, thr in ((4, 0.5), (7, 0.5), (3, 0.9), (7, -1.0), (7, 1.0)):
    src, dst, w = infomap_edges(x, k=k, min_similarity=thr)
    want = _walk_by_hand(x, k, thr)
    assert [(int(a), int(b)) for a, b in zip(src, dst)] == [(a, b) for a, b, _ in want]
    np.testing.assert_allclose(w, [c for _, _, c in want], atol=1e-6)


def test_walk_stops_at_first_failure_and_caps_at_k_minus_one():
  # Row 0 has 6 neighbours above 0.5 but k = 4 keeps only 3 of them; row 7 (isolated
  # direction) has none.
  x = _angles([0, 10, 12, 14, 16, 18, 20, 120])
  src, dst, _ = infomap_edges(x, k=4, min_similarity=0.5)
  assert np.sum(src == 0) == 3 and list(dst[src == 0]) == [1, 2, 3]
  assert np.sum(src == 7) == 0 and np.sum(dst == 7) == 0
  counts = np.bincount(src, minlength=len(x))
  assert counts.max() <= 3


def _separated(sizes, isolated, dim, seed):
  """Clusters on orthogonal axes (cos ~0.98 inside, ~0 across) plus isolated points."""
  rng = np.random.default_rng(seed)
  assert len(sizes) + isolated <= dim
  rows, truth = [], []
  for c, size in enumerate(sizes):
    pts = np.zeros((size, dim))
    pts[:, c] = 1.0
    pts += 0.05 * rng.normal(size=(size, dim)) * (np.arange(dim) >= len(sizes) + isolated)
    rows.append(pts)
    truth += [c] * size
  for j in range(isolated):
    pt = np.zeros((1, dim))
    pt[0, len(sizes) + j] = 1.0
    rows.append(pt)
    truth.append(len(sizes) + j)
  x = np.concatenate(rows)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  perm = rng.permutation(len(x))
  return x[perm].astype(np.float32), np.asarray(truth)[perm]


def _expected_labels(truth, min_size):
  """Groups of size >= min_size numbered by their smallest member index, the rest -1."""
  out = np.full(truth.size, -1, dtype=np.int64)
  next_id = 0
  for i in range(truth.size):
    if out[i] != -1 or np.sum(truth == truth[i]) < min_size:
      continue
    out[truth == truth[i]] = next_id
    next_id += 1
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_partition_on_separated_clusters(seed):
  sizes = [5, 6, 9, 12, 16, 20, 4, 3, 2]  # the last three are too small to keep
  x, truth = _separated(sizes, isolated=7, dim=64, seed=seed)
  labels = infomap_labels(x)
  assert labels.dtype == np.int64
  np.testing.assert_array_equal(labels, _expected_labels(truth, 5))
  assert labels.max() + 1 == 6
  np.testing.assert_array_equal(infomap_labels(x), labels)  # deterministic
  # min_cluster_size is the smallest kept size: 3 keeps the cluster of 3 as well, 1 keeps
  # everything, isolated points included (each its own cluster).
  np.testing.assert_array_equal(infomap_labels(x, min_cluster_size=3), _expected_labels(truth, 3))
  np.testing.assert_array_equal(infomap_labels(x, min_cluster_size=1), _expected_labels(truth, 1))
  np.testing.assert_array_equal(infomap_labels(x, min_cluster_size=21), -np.ones(len(x), int))


def test_no_edges_and_invalid_arguments():
  x = np.eye(6, dtype=np.float32)  # all orthogonal: no edge at all
  np.testing.assert_array_equal(infomap_labels(x), -np.ones(6, dtype=np.int64))
  np.testing.assert_array_equal(infomap_labels(x, min_cluster_size=1), np.arange(6))
  with pytest.raises(ValueError):
    infomap_labels(x, min_cluster_size=0)
  with pytest.raises(ValueError):
    infomap_edges(x, k=0)


def _noisy_clusters():
  """60 features around 6 centres, noisy enough that InfoMap's seed changes the partition."""
  rng = np.random.default_rng(52)
  centers = rng.normal(size=(6, 16))
  x = centers[rng.integers(6, size=60)] + rng.normal(scale=0.6, size=(60, 16))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _partition(labels):
  """The partition as a set of frozensets (numbering-free)."""
  return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


def test_default_seed_is_the_packages_own():
  """Without a seed, InfoMap runs with the package's default seed, as the reference calls it.

  The partition equals the one the ``infomap`` package finds, called directly with no seed
  option, on the same edges. Seed 1 (the seed fixed before) gives another partition here.
  """
  x = _noisy_clusters()
  src, dst, weight = clustering.infomap_edges(x, k=15, min_similarity=0.5)
  solver = infomap.Infomap("--two-level --directed --silent")
  solver.add_links(zip(src.tolist(), dst.tolist(), weight.astype(np.float64).tolist()))
  modules = solver.run().modules()
  direct = np.array([modules.get(i, -1 - i) for i in range(len(x))])
  labels = clustering.infomap_labels(x, k=15, min_similarity=0.5, min_cluster_size=1)
  assert _partition(labels) == _partition(direct)
  seeded = clustering.infomap_labels(x, k=15, min_similarity=0.5, min_cluster_size=1, seed=1)
  assert _partition(seeded) != _partition(labels)
