"""RLCC consensus matrix and soft targets (docs/algorithms.md section 6).

The vectorised code is checked against Python-set IoUs, a per-sample loop transcription of the
documented rules, and a small example worked out by hand in singleton-outlier mode.
"""

import numpy as np
import pytest
import scipy.sparse as sp

from ccreid_jax.clustering import relabel_consecutive, rlcc
from ccreid_jax.clustering.rlcc import (
  consensus_matrix,
  consensus_stats,
  keep_outliers_as_singletons,
  previous_predictions,
  soft_labels,
)

# ---------------------------------------------------------------------------------------------
# References (slow, obvious)


def iou_sets(prev_labels, labels):
  """Raw IoU from Python sets; outliers (-1) are in no set, sizes count every member."""
  num_prev = max(int(np.max(prev_labels)) + 1, 0)
  num_cur = max(int(np.max(labels)) + 1, 0)
  a = [set(np.flatnonzero(prev_labels == j).tolist()) for j in range(num_prev)]
  b = [set(np.flatnonzero(labels == k).tolist()) for k in range(num_cur)]
  out = np.zeros((num_prev, num_cur))
  for j in range(num_prev):
    for k in range(num_cur):
      inter = len(a[j] & b[k])
      if inter:
        out[j, k] = inter / len(a[j] | b[k])
  return out


def row_normalise(c):
  sums = c.sum(axis=1, keepdims=True)
  return np.where(sums > 0, c / np.where(sums > 0, sums, 1.0), 0.0)


def targets_loop(features, labels, prev_labels, prev_centroids, alpha, beta, temp, use_prev_onehot):
  """One sample at a time, following the rules in the soft_labels docstring."""
  cbar = row_normalise(iou_sets(prev_labels, labels))
  num_prev = prev_centroids.shape[0]
  cbar = np.pad(cbar, ((0, num_prev - cbar.shape[0]), (0, 0)))
  num_cur = cbar.shape[1]
  out = np.zeros((labels.size, num_cur))
  for i in range(labels.size):
    if labels[i] < 0:
      continue
    onehot = np.eye(num_cur)[labels[i]]
    logits = temp * (prev_centroids.astype(np.float64) @ features[i].astype(np.float64))
    q = np.exp(logits - logits.max())
    q /= q.sum()
    j = prev_labels[i]
    hard = cbar[j] if j >= 0 and cbar[j].sum() > 0 else onehot
    soft = q @ cbar
    soft = soft / soft.sum() if soft.sum() > 1e-12 else onehot
    prop = alpha * hard + (1 - alpha) * soft if use_prev_onehot else soft
    yhat = beta * hard + (1 - beta) * prop
    out[i] = alpha * onehot + (1 - alpha) * yhat
  return out


def soft_cross_entropy_numpy(logits, targets):
  z = logits - logits.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return -(targets * log_p).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Random label pairs with every kind of change between the two clusterings


def evolve(prev, rng):
  """Current labels from previous ones: split, merge, dissolve, new cluster, noise."""
  cur = prev.copy()
  k = int(prev.max()) + 1
  ids = rng.permutation(k)
  split, merge_a, merge_b, dissolve = ids[:4]
  members = np.flatnonzero(prev == split)
  cur[members[rng.random(members.size) < 0.5]] = k  # split: half of one cluster moves away
  cur[prev == merge_b] = merge_a  # merge
  cur[prev == dissolve] = -1  # dissolve: every member is an outlier now
  outliers = np.flatnonzero(prev < 0)
  cur[outliers[: outliers.size // 2]] = k + 1  # new cluster made of previous outliers
  # Noise that leaves the dissolved cluster dissolved and the new cluster new.
  noise = (rng.random(prev.size) < 0.1) & (prev != dissolve) & (cur != k + 1)
  cur[noise] = rng.integers(-1, k + 1, noise.sum())
  return relabel_consecutive(cur)  # no empty current cluster


def random_pair(seed, n=120, k=9):
  rng = np.random.default_rng(seed)
  prev = rng.integers(0, k, n)
  prev[rng.random(n) < 0.15] = -1
  prev[:k] = np.arange(k)  # every previous cluster is used
  return prev, evolve(prev, rng), rng


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# consensus_matrix


@pytest.mark.parametrize("seed", range(6))
def test_consensus_matches_sets(seed):
  prev, cur, _ = random_pair(seed)
  raw = consensus_matrix(prev, cur, normalize=False)
  want = iou_sets(prev, cur)
  assert raw.dtype == np.float32 and raw.shape == want.shape
  np.testing.assert_allclose(raw, want, rtol=1e-6, atol=0)
  cbar = consensus_matrix(prev, cur)
  np.testing.assert_allclose(cbar, row_normalise(want), rtol=1e-6, atol=1e-7)
  for normalize in (False, True):
    dense = consensus_matrix(prev, cur, normalize=normalize)
    sparse = consensus_matrix(prev, cur, normalize=normalize, sparse=True)
    assert sp.issparse(sparse) and sparse.format == "csr"
    np.testing.assert_array_equal(sparse.toarray(), dense)
  # The generator dissolves one cluster and makes new ones: both shapes must show up.
  sums = cbar.sum(axis=1)
  assert np.any(sums == 0)
  assert np.all((sums == 0) | (np.abs(sums - 1) < 1e-6))
  assert np.all(cbar[sums == 0] == 0)
  assert np.any(raw.sum(axis=0) == 0)


def test_consensus_outliers_count_in_sizes_only():
  prev = np.array([0, 0, 0, -1, 1])
  cur = np.array([0, -1, 0, 0, -1])
  # A_0 = {0,1,2}, A_1 = {4}; B_0 = {0,2,3}. |A_0 & B_0| = 2, union = 3 + 3 - 2 = 4.
  # Sample 1 (outlier now) and 3 (outlier before) are in the sizes, not the intersection.
  raw = consensus_matrix(prev, cur, normalize=False)
  np.testing.assert_allclose(raw, [[0.5], [0.0]])
  np.testing.assert_array_equal(consensus_matrix(prev, cur), [[1.0], [0.0]])  # row 1 dissolved


def test_consensus_declared_sizes_and_empty():
  c = consensus_matrix([0, 1, -1], [1, 1, -1], num_prev_clusters=4, num_clusters=3)
  assert c.shape == (4, 3)
  np.testing.assert_allclose(c[:2], [[0, 1, 0], [0, 1, 0]])
  assert not c[2:].any() and not c[:, 0].any()
  assert consensus_matrix([-1, -1], [-1, -1]).shape == (0, 0)
  assert consensus_matrix([-1, -1], [-1, -1], sparse=True).shape == (0, 0)
  with pytest.raises(ValueError):
    consensus_matrix([0, 1], [0])
  with pytest.raises(ValueError):
    consensus_matrix([0, 3], [0, 0], num_prev_clusters=2)


# ---------------------------------------------------------------------------------------------
# Predictions against the previous centroids


def test_previous_predictions_temperature_30():
  rng = np.random.default_rng(0)
  f = unit(rng.normal(size=(11, 8))).astype(np.float32)
  c = unit(rng.normal(size=(5, 8))).astype(np.float32)
  logits = 30.0 * f.astype(np.float64) @ c.T.astype(np.float64)
  want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  q = previous_predictions(f, c)
  assert q.dtype == np.float32
  np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    previous_predictions(f, c, pred_temp=5.0),
    np.exp(logits / 6) / np.exp(logits / 6).sum(1, keepdims=True),
    rtol=1e-5,
    atol=1e-7,
  )


def test_soft_labels_use_previous_centroids_with_temperature():
  # Same clustering twice and no outliers: Cbar = I, so on the first RLCC epoch yhat = q.
  rng = np.random.default_rng(1)
  n, d, k = 20, 6, 4
  labels = np.arange(n) % k
  f = unit(rng.normal(size=(n, d))).astype(np.float32)
  prev_c = unit(rng.normal(size=(k, d))).astype(np.float32)
  q = np.exp(30.0 * f.astype(np.float64) @ prev_c.T)
  q /= q.sum(axis=1, keepdims=True)
  t = soft_labels(f, labels, labels, prev_c, use_prev_onehot=False, alpha=0.7)
  np.testing.assert_allclose(t, 0.7 * np.eye(k)[labels] + 0.3 * q, rtol=1e-5, atol=1e-6)
  # Other previous centroids give other targets.
  assert not np.allclose(
    t, soft_labels(f, labels, labels, -prev_c, use_prev_onehot=False, alpha=0.7), atol=1e-3
  )


# ---------------------------------------------------------------------------------------------
# soft_labels: invariants and the per-sample transcription


def random_problem(seed, d=8):
  prev, cur, rng = random_pair(seed, n=60, k=6)
  num_prev = int(prev.max()) + 1
  f = unit(rng.normal(size=(prev.size, d))).astype(np.float32)
  prev_c = unit(rng.normal(size=(num_prev, d))).astype(np.float32)
  return f, cur, prev, prev_c


@pytest.mark.parametrize("use_prev_onehot", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_soft_labels_match_loop(monkeypatch, use_prev_onehot, beta):
  monkeypatch.setattr(rlcc, "_BLOCK_ROWS", 7)  # several blocks, a ragged last one
  for seed in range(3):
    f, cur, prev, prev_c = random_problem(seed)
    t = soft_labels(
      f, cur, prev, prev_c, use_prev_onehot=use_prev_onehot, alpha=0.9, beta=beta, pred_temp=8.0
    )
    want = targets_loop(f, cur, prev, prev_c, 0.9, beta, 8.0, use_prev_onehot)
    assert t.dtype == np.float32 and t.shape == want.shape
    np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-6)
    clustered = cur >= 0
    assert np.all(t >= 0)
    np.testing.assert_allclose(t[clustered].sum(axis=1), 1.0, atol=1e-6)
    assert not t[~clustered].any()  # current outliers: all-zero rows


@pytest.mark.parametrize("use_prev_onehot", [False, True])
def test_alpha_one_is_exact_onehot(use_prev_onehot):
  f, cur, prev, prev_c = random_problem(3)
  t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=use_prev_onehot, alpha=1.0)
  want = np.zeros_like(t)
  want[cur >= 0, cur[cur >= 0]] = 1.0
  np.testing.assert_array_equal(t, want)


def test_beta_one_uses_cbar_row_of_previous_label():
  f, cur, prev, prev_c = random_problem(4)
  cbar = consensus_matrix(prev, cur, num_prev_clusters=prev_c.shape[0])
  alpha = 0.8
  for use_prev_onehot in (False, True):  # hard propagation ignores q and the epoch
    t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=use_prev_onehot, alpha=alpha, beta=1.0)
    for i in np.flatnonzero((cur >= 0) & (prev >= 0)):
      np.testing.assert_allclose(
        t[i],
        alpha * np.eye(cur.max() + 1)[cur[i]] + (1 - alpha) * cbar[prev[i]],
        rtol=1e-6,
        atol=1e-7,
      )
  # Passing Cbar in (dense or sparse) changes nothing.
  for given in (cbar, sp.csr_matrix(cbar)):
    np.testing.assert_array_equal(
      soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, beta=0.5, consensus=given),
      soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, beta=0.5),
    )


# ---------------------------------------------------------------------------------------------
# Outlier rules (outliers dropped)


def test_previous_outlier_uses_current_onehot_for_hard_part():
  # Sample 2 was an outlier; its hard part is onehot(y_2) = e_1, its soft part q_2 Cbar.
  prev = np.array([0, 0, -1, 1, 1])
  cur = np.array([0, 0, 1, 1, 1])
  # A_0 = {0,1}, A_1 = {3,4}; B_0 = {0,1}, B_1 = {2,3,4}: C = [[1, 0], [0, 2/3]], Cbar = I.
  f = np.array([[1.0, 0.0]] * 5, dtype=np.float32)
  prev_c = np.eye(2, dtype=np.float32)
  q2 = np.exp([30.0, 0.0]) / np.exp([30.0, 0.0]).sum()  # f_2 = e_0 points at prev cluster 0
  alpha = 0.9
  t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, alpha=alpha)
  yhat2 = alpha * np.array([0.0, 1.0]) + (1 - alpha) * q2
  np.testing.assert_allclose(t[2], alpha * np.array([0.0, 1.0]) + (1 - alpha) * yhat2, rtol=1e-6)
  # Hard propagation: the hard part only, i.e. exactly the current one-hot.
  t_hard = soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, alpha=alpha, beta=1.0)
  np.testing.assert_array_equal(t_hard[2], [0.0, 1.0])
  # Every sample a previous outlier and no previous cluster at all: plain one-hot targets.
  t_none = soft_labels(f, cur, -np.ones(5, int), np.zeros((0, 2), np.float32), use_prev_onehot=True)
  np.testing.assert_array_equal(t_none, np.eye(2)[cur])


def test_dissolved_cluster_mass_is_renormalised_or_falls_back():
  # Previous cluster 0 = {0, 1} dissolves (both outliers now); cluster 1 = {2, 3, 4} stays.
  prev = np.array([0, 0, 1, 1, 1])
  cur = np.array([-1, -1, 0, 0, 1])
  # B_0 = {2, 3}, B_1 = {4}: C[1] = [2/3, 1/3], Cbar[1] = [2/3, 1/3]; Cbar[0] = 0.
  prev_cc = np.eye(2, dtype=np.float32)
  theta = np.deg2rad(80.0)
  f = np.array([[1.0, 0.0]] * 4 + [[np.cos(theta), np.sin(theta)]], dtype=np.float32)
  alpha = 0.9
  # Sample 4: q_4 puts mass on dissolved cluster 0; the soft part q_4 Cbar = q_4[1] * Cbar[1]
  # is renormalised back to Cbar[1]; first RLCC epoch, so yhat_4 = Cbar[1].
  t = soft_labels(f, cur, prev, prev_cc, use_prev_onehot=False, alpha=alpha)
  np.testing.assert_allclose(
    t[4], alpha * np.array([0.0, 1.0]) + (1 - alpha) * np.array([2 / 3, 1 / 3]), rtol=1e-6
  )
  # Sample 2 points straight at the dissolved cluster: q_2[1] = e^-30 / (1 + e^-30) ~ 1e-13
  # is below 1e-12, so the soft part falls back to onehot(y_2) = e_0 (without the fallback,
  # renormalising would give Cbar[1] = [2/3, 1/3]).
  np.testing.assert_allclose(t[2], [1.0, 0.0], atol=1e-7)
  assert not t[:2].any()


# ---------------------------------------------------------------------------------------------
# Singleton-outlier mode: a hand-worked example of the official formulas


def test_keep_outliers_as_singletons():
  np.testing.assert_array_equal(keep_outliers_as_singletons([-1, 0, 2, -1, 1]), [3, 0, 2, 4, 1])
  np.testing.assert_array_equal(keep_outliers_as_singletons([-1, -1, -1]), [0, 1, 2])
  np.testing.assert_array_equal(keep_outliers_as_singletons([1, 0]), [1, 0])
  assert keep_outliers_as_singletons(np.zeros(0, int)).size == 0


def test_hand_worked_singleton_example():
  # Previous  y' = [0, 0, 0, 1, 1, -1] -> singletons [0, 0, 0, 1, 1, 2]   (K' = 3)
  # Current   y  = [0, 0, 1, 1, -1, 1] -> singletons [0, 0, 1, 1, 2, 1]   (K = 3)
  prev = keep_outliers_as_singletons([0, 0, 0, 1, 1, -1])
  cur = keep_outliers_as_singletons([0, 0, 1, 1, -1, 1])
  np.testing.assert_array_equal(prev, [0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(cur, [0, 0, 1, 1, 2, 1])
  # A_0 = {0,1,2}, A_1 = {3,4}, A_2 = {5};  B_0 = {0,1}, B_1 = {2,3,5}, B_2 = {4}.
  # C[0,0] = |{0,1}| / (3 + 2 - 2) = 2/3      C[0,1] = |{2}| / (3 + 3 - 1) = 1/5
  # C[1,1] = |{3}|   / (2 + 3 - 1) = 1/4      C[1,2] = |{4}| / (2 + 1 - 1) = 1/2
  # C[2,1] = |{5}|   / (1 + 3 - 1) = 1/3      all others 0.
  raw = np.array([[2 / 3, 1 / 5, 0], [0, 1 / 4, 1 / 2], [0, 1 / 3, 0]])
  np.testing.assert_allclose(consensus_matrix(prev, cur, normalize=False), raw, rtol=1e-6)
  # Row sums 13/15, 3/4, 1/3:
  # Cbar[0] = [10/13, 3/13, 0],  Cbar[1] = [0, 1/3, 2/3],  Cbar[2] = [0, 1, 0].
  cbar = np.array([[10 / 13, 3 / 13, 0], [0, 1 / 3, 2 / 3], [0, 1, 0]])
  np.testing.assert_allclose(consensus_matrix(prev, cur), cbar, rtol=1e-6)

  # Previous centroids e_0, e_1, e_2 (the singleton's centroid is its own feature e_2).
  # Features: samples 0, 1 -> e_0;  2, 3, 4 -> e_1;  5 -> e_2.
  # With pred_temp = ln 3 a unit feature e_m gives logits ln3 * e_m, so
  # q = [3, 1, 1] / 5 = [0.6, 0.2, 0.2] rotated to put 0.6 on m.
  prev_c = np.eye(3, dtype=np.float32)
  f = np.eye(3, dtype=np.float32)[[0, 0, 1, 1, 1, 2]]
  temp = np.log(3.0)
  a = 0.9

  # From the second RLCC epoch on: P_i = 0.9 onehot(y'_i) + 0.1 q_i.
  # i=0: q=[.6,.2,.2], y'=0 -> P=[.96,.02,.02]
  #      yhat = .96 Cbar[0] + .02 Cbar[1] + .02 Cbar[2]
  #           = [.96*10/13, .96*3/13 + .02/3 + .02, .02*2/3]
  # i=2: q=[.2,.6,.2], y'=0 -> P=[.92,.06,.02]
  #      yhat = [.92*10/13, .92*3/13 + .06/3 + .02, .06*2/3]
  # i=3, 4: q=[.2,.6,.2], y'=1 -> P=[.02,.96,.02]
  #      yhat = [.02*10/13, .02*3/13 + .96/3 + .02, .96*2/3]
  # i=5: q=[.2,.2,.6], y'=2 -> P=[.02,.02,.96]
  #      yhat = [.02*10/13, .02*3/13 + .02/3 + .96, .02*2/3]
  yhat = np.array(
    [
      [0.96 * 10 / 13, 0.96 * 3 / 13 + 0.02 / 3 + 0.02, 0.02 * 2 / 3],
      [0.96 * 10 / 13, 0.96 * 3 / 13 + 0.02 / 3 + 0.02, 0.02 * 2 / 3],
      [0.92 * 10 / 13, 0.92 * 3 / 13 + 0.06 / 3 + 0.02, 0.06 * 2 / 3],
      [0.02 * 10 / 13, 0.02 * 3 / 13 + 0.96 / 3 + 0.02, 0.96 * 2 / 3],
      [0.02 * 10 / 13, 0.02 * 3 / 13 + 0.96 / 3 + 0.02, 0.96 * 2 / 3],
      [0.02 * 10 / 13, 0.02 * 3 / 13 + 0.02 / 3 + 0.96, 0.02 * 2 / 3],
    ]
  )
  np.testing.assert_allclose(yhat.sum(axis=1), 1.0, atol=1e-12)  # the hand sums are right
  # ytilde_i = 0.9 onehot(y_i) + 0.1 yhat_i with y = [0, 0, 1, 1, 2, 1]; e.g.
  # ytilde_0 = [.9 + .0738462, .0248205, .0013333],  ytilde_4 = [.0015385, .0344615, .9 + .064].
  want = a * np.eye(3)[cur] + (1 - a) * yhat
  t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, alpha=a, pred_temp=temp)
  np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(t[0], [0.9738462, 0.0248205, 0.0013333], atol=1e-6)
  np.testing.assert_allclose(t[4], [0.0015385, 0.0344615, 0.964], atol=1e-6)

  # First RLCC epoch: P_i = q_i.
  # i=0: yhat = .6 Cbar[0] + .2 Cbar[1] + .2 Cbar[2] = [6/13, 1.8/13 + .2/3 + .2, .4/3]
  # i=5: yhat = .2 Cbar[0] + .2 Cbar[1] + .6 Cbar[2] = [2/13, .6/13 + .2/3 + .6, .4/3]
  t1 = soft_labels(f, cur, prev, prev_c, use_prev_onehot=False, alpha=a, pred_temp=temp)
  np.testing.assert_allclose(
    t1[0],
    a * np.eye(3)[0] + (1 - a) * np.array([6 / 13, 1.8 / 13 + 0.2 / 3 + 0.2, 0.4 / 3]),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    t1[5],
    a * np.eye(3)[1] + (1 - a) * np.array([2 / 13, 0.6 / 13 + 0.2 / 3 + 0.6, 0.4 / 3]),
    rtol=1e-5,
  )

  # Hard propagation (beta = 1): yhat_2 = Cbar[y'_2] = Cbar[0], ytilde_2 = .9 e_1 + .1 Cbar[0].
  th = soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, alpha=a, beta=1.0, pred_temp=temp)
  np.testing.assert_allclose(th[2], [1 / 13, 0.9 + 0.3 / 13, 0.0], rtol=1e-5, atol=1e-8)

  # The soft-target CE equals alpha * CE(hard) + (1 - alpha) * CE(yhat).
  logits = np.random.default_rng(0).normal(size=(6, 3))
  np.testing.assert_allclose(
    soft_cross_entropy_numpy(logits, t),
    a * soft_cross_entropy_numpy(logits, np.eye(3)[cur])
    + (1 - a) * soft_cross_entropy_numpy(logits, yhat),
    rtol=1e-5,
  )


# ---------------------------------------------------------------------------------------------
# consensus_stats


def test_consensus_stats_hand_made():
  prev = np.array([0, 0, 1, 1, 2, 2, -1, -1])
  cur = np.array([0, 0, 0, 0, -1, -1, 1, 1])
  # Previous 0 and 1 merge into current 0; previous 2 dissolves (4, 5 are outliers now);
  # current 1 is new (6, 7 were outliers).
  targets = np.array(
    [
      [0.9, 0.1],
      [0.6, 0.4],
      [0.3, 0.7],  # argmax 1 != 0
      [1.0, 0.0],
      [0.0, 1.0],  # outlier row: ignored
      [0.0, 1.0],  # outlier row: ignored
      [0.2, 0.8],
      [0.5, 0.5],  # argmax 0 != 1
    ]
  )
  stats = consensus_stats(prev, cur, targets)
  assert stats["num_clusters"] == 2
  assert stats["num_prev_clusters"] == 3
  assert stats["num_dissolved"] == 1
  assert stats["num_new"] == 1
  assert stats["mean_max_target"] == pytest.approx((0.9 + 0.6 + 0.7 + 1.0 + 0.8 + 0.5) / 6)
  assert stats["frac_argmax_changed"] == pytest.approx(2 / 6)
  cbar = consensus_matrix(prev, cur, num_prev_clusters=4)  # one more, empty, previous cluster
  stats4 = consensus_stats(prev, cur, targets, consensus=cbar)
  assert stats4["num_prev_clusters"] == 4 and stats4["num_dissolved"] == 2


def test_consensus_stats_on_targets():
  f, cur, prev, prev_c = random_problem(5)
  t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=True, alpha=1.0)
  stats = consensus_stats(prev, cur, t, num_prev_clusters=prev_c.shape[0])
  assert stats["mean_max_target"] == 1.0 and stats["frac_argmax_changed"] == 0.0
  raw = iou_sets(prev, cur)
  assert stats["num_dissolved"] == int(np.sum(raw.sum(axis=1) == 0)) >= 1
  assert stats["num_new"] == int(np.sum(raw.sum(axis=0) == 0)) >= 1
  t = soft_labels(f, cur, prev, prev_c, use_prev_onehot=False, alpha=0.5)
  stats = consensus_stats(prev, cur, t)
  assert 0.5 <= stats["mean_max_target"] < 1.0
