"""SpCL's reliability criterion (docs/algorithms.md section 10) against a loop transcription."""

import collections

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from ccreid_jax.clustering import jaccard_distance, reliable_dbscan_labels


def _graph(n, edges):
  """Sparse (jaccard_distance convention: zero diagonal stored, absent = 1.0) and dense forms."""
  rows = [i for i, _, _ in edges] + [j for _, j, _ in edges] + list(range(n))
  cols = [j for _, j, _ in edges] + [i for i, _, _ in edges] + list(range(n))
  vals = [d for *_, d in edges] * 2 + [0.0] * n
  sparse = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, n))
  return sparse, _dense(sparse)


def _dense(sparse):
  coo = sparse.tocoo()
  dense = np.ones(sparse.shape, dtype=np.float32)
  dense[coo.row, coo.col] = coo.data
  return dense


def _reference(dense, eps, min_samples, singletons=True, threshold=None):
  """Loop transcription of the reference's definition, with a Python set per sample.

  Returns (labels, threshold, counts): counts tallies the members split off by the independence
  test ("indep"), those split off by the compactness test only ("comp"), and the failing
  members of classes of 2+ kept as the last member of their class ("kept_last").
  """
  n = dense.shape[0]
  runs = []
  for radius in eps:  # tight, normal, loose
    raw = DBSCAN(eps=radius, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    labels, extra = list(raw), 0
    for i in range(n):
      if labels[i] == -1:
        labels[i] = raw.max() + 1 + extra
        extra += 1
    runs.append((raw, labels))
  raw_normal, normal = runs[1]
  neighbours = []
  for _, labels in runs:
    groups = collections.defaultdict(set)
    for i, label in enumerate(labels):
      groups[label].add(i)
    neighbours.append([groups[label] for label in labels])
  tight_sets, normal_sets, loose_sets = neighbours

  def one_minus_iou(a, b):
    return float(np.float32(1) - np.float32(len(a & b)) / np.float32(len(a | b)))

  comp = [one_minus_iou(normal_sets[i], tight_sets[i]) for i in range(n)]
  indep = [one_minus_iou(normal_sets[i], loose_sets[i]) for i in range(n)]
  comp_min, indep_min, size = {}, {}, collections.Counter(normal)
  for i, label in enumerate(normal):
    comp_min[label] = min(comp_min.get(label, 2.0), comp[i])
    indep_min[label] = min(indep_min.get(label, 2.0), indep[i])
  if threshold is None:
    minima = sorted(indep_min[label] for label in indep_min if size[label] > 1)
    if minima:
      threshold = minima[min(len(minima) - 1, int(np.round(len(minima) * 0.9)))]
  out = list(normal)
  next_label = max(normal) + 1
  if not singletons:
    out = [-1 if raw < 0 else label for raw, label in zip(raw_normal, normal)]
    next_label = raw_normal.max() + 1
  remaining = dict(size)
  counts = collections.Counter()
  for i, label in enumerate(normal):
    if not singletons and raw_normal[i] < 0:
      continue
    by_indep = threshold is not None and indep_min[label] > threshold
    by_comp = comp[i] > comp_min[label]
    if by_indep or by_comp:
      if remaining[label] > 1:
        out[i] = next_label
        next_label += 1
        remaining[label] -= 1
        counts["indep" if by_indep else "comp"] += 1
      elif size[label] > 1:
        counts["kept_last"] += 1
  return np.array(out, dtype=np.int64), threshold, counts


def _hand_case():
  # min_samples 2, eps (0.3, 0.5, 0.7). Links: 0-1 0.2, 1-2 0.4, 3-4 0.2, 4-5 0.6, 6-7 0.4,
  # 7-8 0.65 (every other pair absent = 1.0).
  return _graph(9, [(0, 1, 0.2), (1, 2, 0.4), (3, 4, 0.2), (4, 5, 0.6), (6, 7, 0.4), (7, 8, 0.65)])


# Hand derivation of _hand_case (min_samples 2):
#   tight 0.3:  {0,1} {3,4}; 2, 5, 6, 7, 8 singletons.
#   normal 0.5: {0,1,2}=0 {3,4}=1 {6,7}=2; outliers 5 -> 3, 8 -> 4.
#   loose 0.7:  {0,1,2} {3,4,5} {6,7,8}.
#   R_comp: 0, 1: 1 - 2/3; 2: 1 - 1/3; 3, 4, 5, 8: 0; 6, 7: 1 - 1/2. Class minima: c0 = 1/3.
#   R_indep: 0, 1, 2: 0; 3, 4, 6, 7: 1 - 2/3; 5, 8: 1 - 1/3 (singletons: never split).
#   Classes of 2+: minima [0, 1/3, 1/3], n = 3, position min(2, round(2.7)) = 2: the threshold is
#   float32 1 - float32(2/3) = 0.3333333134651184 (not float32(1/3) = 0.3333333432674408).
#   Classes 1 and 2 sit exactly at it (strict test: kept); only 2 fails (R_comp 2/3 > 1/3) and
#   becomes label K + O = 3 + 2 = 5.
_HAND_EPS = (0.3, 0.5, 0.7)
_HAND_THRESHOLD = 0.3333333134651184
_HAND_LABELS = [0, 0, 5, 1, 1, 3, 2, 2, 4]
# Outliers as -1: the split member 2 takes the first label after the K = 3 clusters.
_HAND_LABELS_NO_SINGLETONS = [0, 0, 3, 1, 1, -1, 2, 2, -1]
# Threshold 0.2: classes 1 {3, 4} and 2 {6, 7} fail as a whole; in index order 2 -> 5, 3 -> 6,
# 4 is the last member of class 1 and stays, 6 -> 7, 7 stays.
_HAND_LABELS_AT_02 = [0, 0, 5, 6, 1, 3, 7, 2, 4]
_HAND_LABELS_AT_02_NO_SINGLETONS = [0, 0, 3, 4, 1, -1, 5, 2, -1]


@pytest.mark.parametrize("form", [0, 1], ids=["sparse", "dense"])
def test_hand_checked_case(form):
  dist = _hand_case()[form]
  labels, threshold = reliable_dbscan_labels(dist, eps=_HAND_EPS, min_samples=2)
  assert labels.dtype == np.int64
  np.testing.assert_array_equal(labels, _HAND_LABELS)
  assert threshold == _HAND_THRESHOLD and isinstance(threshold, float)
  labels, threshold = reliable_dbscan_labels(
    dist, eps=_HAND_EPS, min_samples=2, outliers_as_singletons=False
  )
  np.testing.assert_array_equal(labels, _HAND_LABELS_NO_SINGLETONS)
  assert threshold == _HAND_THRESHOLD


@pytest.mark.parametrize("form", [0, 1], ids=["sparse", "dense"])
def test_given_threshold_is_reused_and_changes_the_split(form):
  dist = _hand_case()[form]
  for singletons, expected in (
    (True, _HAND_LABELS_AT_02),
    (False, _HAND_LABELS_AT_02_NO_SINGLETONS),
  ):
    labels, threshold = reliable_dbscan_labels(
      dist, eps=_HAND_EPS, min_samples=2, outliers_as_singletons=singletons, indep_threshold=0.2
    )
    np.testing.assert_array_equal(labels, expected)
    assert threshold == 0.2
  # Passing the first call's value gives the first call's result back.
  labels, threshold = reliable_dbscan_labels(
    dist, eps=_HAND_EPS, min_samples=2, indep_threshold=_HAND_THRESHOLD
  )
  np.testing.assert_array_equal(labels, _HAND_LABELS)
  assert threshold == _HAND_THRESHOLD
  # Compared in float64: 0.3333333 is below the float32 score 0.33333331 (in float32 the two
  # are equal and nothing would be split), so classes 1 and 2 fail as at 0.2.
  labels, _ = reliable_dbscan_labels(dist, eps=_HAND_EPS, min_samples=2, indep_threshold=0.3333333)
  np.testing.assert_array_equal(labels, _HAND_LABELS_AT_02)


def _pairs_with_loose_tails(num_classes):
  """Class j: a pair at 0.2 plus j points at 0.6 from its second member (loose-only tails).

  With eps (0.3, 0.5, 0.7) and min_samples 2, the pair's R_indep is 1 - 2 / (j + 2): the class
  minima increase strictly with j, the tails are singletons at the normal radius.
  """
  edges, start = [], 0
  for j in range(num_classes):
    edges.append((start, start + 1, 0.2))
    edges += [(start + 1, start + 2 + t, 0.6) for t in range(j)]
    start += j + 2
  return _graph(start, edges)[0]


# n classes of two or more -> position min(n - 1, round(0.9 n)) of the sorted minima, by hand:
# 11 -> round(9.9) = 10 = n - 1; 16 -> round(14.4) = 14; 25 -> round(22.5) = 22 (half to even;
# half up would give 23). The classes above the position fail; each loses its first member.
@pytest.mark.parametrize("num_classes, position", [(11, 10), (16, 14), (25, 22)])
def test_threshold_position_and_rounding(num_classes, position):
  dist = _pairs_with_loose_tails(num_classes)
  labels, threshold = reliable_dbscan_labels(dist, eps=_HAND_EPS, min_samples=2)
  size = position + 2  # loose cluster size of the class at that position
  assert threshold == float(np.float32(1) - np.float32(2) / np.float32(size))
  num_tails = num_classes * (num_classes - 1) // 2
  first_split = num_classes + num_tails  # after the K clusters and the O outliers
  starts = np.cumsum([0] + [j + 2 for j in range(num_classes - 1)])
  expected = np.empty(labels.size, dtype=np.int64)
  expected[starts] = expected[starts + 1] = np.arange(num_classes)
  tails = np.setdiff1d(np.arange(labels.size), np.concatenate([starts, starts + 1]))
  expected[tails] = num_classes + np.arange(num_tails)
  failing = np.arange(position + 1, num_classes)
  expected[starts[failing]] = first_split + np.arange(failing.size)
  np.testing.assert_array_equal(labels, expected)


def _clustered_features(seed):
  """~330 unit vectors in 16-d: groups of 1-3 nearby sub-clusters of 2-11 points, plus noise."""
  rng = np.random.default_rng(seed)
  parts = []
  for _ in range(25):
    group = rng.normal(size=16)
    group /= np.linalg.norm(group)
    for _ in range(rng.integers(1, 4)):
      centre = group + rng.uniform(0.1, 0.5) * rng.normal(size=16) / 4
      parts.append(centre + rng.uniform(0.1, 0.4) / 4 * rng.normal(size=(rng.integers(2, 12), 16)))
  parts.append(rng.normal(size=(10, 16)))
  x = np.concatenate(parts)[rng.permutation(sum(len(p) for p in parts))]
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
  "seed, k1, k2, eps",
  [
    (0, 10, 3, (0.5, 0.55, 0.6)),
    (0, 15, 4, (0.45, 0.55, 0.65)),
    (1, 10, 3, (0.5, 0.55, 0.6)),
    (3, 15, 4, (0.45, 0.55, 0.65)),
  ],
)
def test_matches_loop_transcription_on_jaccard_distances(seed, k1, k2, eps):
  x = _clustered_features(seed)
  sparse = jaccard_distance(x, k1=k1, k2=k2, max_distance=eps[2])
  dense = _dense(jaccard_distance(x, k1=k1, k2=k2))
  for singletons in (True, False):
    expected, expected_threshold, counts = _reference(dense, eps, 4, singletons)
    # Both kinds of failure and the last-member rule occur, so each part is exercised.
    assert counts["comp"] > 0 and counts["indep"] > 0 and counts["kept_last"] > 0
    for dist in (sparse, dense):
      labels, threshold = reliable_dbscan_labels(
        dist, eps=eps, min_samples=4, outliers_as_singletons=singletons
      )
      np.testing.assert_array_equal(labels, expected)
      assert threshold == expected_threshold
      # Reusing the threshold of this "first epoch" gives the same labels.
      again, kept = reliable_dbscan_labels(
        dist, eps=eps, min_samples=4, outliers_as_singletons=singletons, indep_threshold=threshold
      )
      np.testing.assert_array_equal(again, labels)
      assert kept == threshold
    # Consecutive labels: 0..C-1 all used (plus -1 without singletons).
    used = np.unique(labels[labels >= 0])
    np.testing.assert_array_equal(used, np.arange(used.size))
    assert (labels < 0).any() != singletons
  # A later epoch with another threshold: the transcription agrees too.
  other = 0.5 * expected_threshold
  expected, _, _ = _reference(dense, eps, 4, True, other)
  labels, threshold = reliable_dbscan_labels(sparse, eps=eps, min_samples=4, indep_threshold=other)
  np.testing.assert_array_equal(labels, expected)
  assert threshold == other


def test_no_class_of_two_leaves_the_threshold_unset():
  sparse, _ = _graph(4, [(0, 1, 0.9)])
  labels, threshold = reliable_dbscan_labels(sparse, eps=_HAND_EPS, min_samples=2)
  np.testing.assert_array_equal(labels, [0, 1, 2, 3])
  assert threshold is None
  labels, threshold = reliable_dbscan_labels(
    sparse, eps=_HAND_EPS, min_samples=2, outliers_as_singletons=False
  )
  np.testing.assert_array_equal(labels, [-1] * 4)
  assert threshold is None
  labels, threshold = reliable_dbscan_labels(np.zeros((0, 0), np.float32), indep_threshold=0.3)
  assert labels.shape == (0,) and threshold == 0.3


@pytest.mark.parametrize(
  "eps, message",
  [
    ((0.58, 0.6), "three"),
    ((0.5, 0.55, 0.6, 0.65), "three"),
    ((0.6, 0.58, 0.62), "increase strictly"),
    ((0.58, 0.6, 0.6), "increase strictly"),
    ((-0.1, 0.6, 0.62), "positive"),
    ((0.58, float("nan"), 0.62), "positive"),
    (0.6, "three radii"),
  ],
)
def test_bad_eps(eps, message):
  sparse, _ = _hand_case()
  with pytest.raises(ValueError, match=message):
    reliable_dbscan_labels(sparse, eps=eps)


def test_bad_inputs():
  sparse, dense = _hand_case()
  with pytest.raises(ValueError, match="square"):
    reliable_dbscan_labels(dense[:, :5])
  with pytest.raises(ValueError, match="square"):
    reliable_dbscan_labels(dense[0])
  with pytest.raises(ValueError, match="square"):
    reliable_dbscan_labels(sparse[:5])
  with pytest.raises(ValueError, match="NaN"):
    reliable_dbscan_labels(sparse, indep_threshold=float("nan"))
  with pytest.raises(ValueError, match="indep_threshold"):
    reliable_dbscan_labels(sparse, indep_threshold="0.3")
  # A sparse distance cannot be clustered at a radius >= 1 (absent entries mean 1.0).
  with pytest.raises(ValueError, match="sparse"):
    reliable_dbscan_labels(sparse, eps=(0.6, 0.8, 1.0))
