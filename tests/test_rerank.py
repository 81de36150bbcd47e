"""k-reciprocal re-ranking against a per-sample loop transcription of Zhong et al. (CVPR 2017)."""

import numpy as np
import pytest

from ccreid_jax.evaluation import evaluate_ranking, pairwise_distance, rerank


def loop_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
  """Re-ranking one sample at a time with Python sets, as docs/algorithms.md section 7 reads.

  Dense (N, N) everything; slow but each line is one sentence of the description.
  """
  num_q = q_g.shape[0]
  stacked = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
  stacked = stacked * stacked  # the inputs are squared distances: squared once more
  d = (stacked / stacked.max(axis=0)).T  # columns over their maxima, then transposed
  n = d.shape[0]
  order = [np.argsort(d[i], kind="stable") for i in range(n)]

  def reciprocal(i, k):
    forward = order[i][: k + 1]
    return [int(j) for j in forward if i in set(order[j][: k + 1].tolist())]

  k_half = int(np.around(k1 / 2.0))
  v = np.zeros((n, n), np.float32)
  for i in range(n):
    r_i = reciprocal(i, k1)
    expanded = set(r_i)
    for c in r_i:
      h_c = reciprocal(c, k_half)
      if len(set(h_c) & set(r_i)) > 2.0 / 3.0 * len(h_c):
        expanded |= set(h_c)
    support = sorted(expanded)
    weight = np.exp(-d[i, support])
    v[i, support] = weight / weight.sum()
  if k2 != 1:
    v_qe = np.zeros_like(v)
    for i in range(n):
      v_qe[i] = v[order[i][:k2]].mean(axis=0)
    v = v_qe
  jaccard = np.zeros((num_q, n), np.float32)
  for i in range(num_q):
    for j in range(n):
      m = np.minimum(v[i], v[j]).sum()
      jaccard[i, j] = 1.0 - m / (2.0 - m)
  final = (1.0 - lambda_value) * jaccard + lambda_value * d[:num_q]
  return final[:, num_q:]


def clustered(num_identities, per_identity, dim, noise, seed, duplicates=0):
  """Unit features around random identity centres; ``duplicates`` exact copies appended."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_identities, dim))
  identities = np.repeat(np.arange(num_identities), per_identity)
  x = centres[identities] + noise * rng.normal(size=(identities.size, dim))
  if duplicates:
    pick = rng.choice(identities.size, duplicates, replace=False)
    x = np.concatenate([x, x[pick]])
    identities = np.concatenate([identities, identities[pick]])
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return x, identities


def split(x, identities, num_q, seed):
  perm = np.random.default_rng(seed).permutation(len(identities))
  q, g = perm[:num_q], perm[num_q:]
  return x[q], identities[q], x[g], identities[g]


@pytest.mark.parametrize(
  "k1,k2,lambda_value,duplicates",
  [
    (20, 6, 0.3, 0),
    (7, 3, 0.5, 0),
    (20, 1, 0.0, 0),
    (9, 4, 0.3, 12),  # exact duplicate features: ties broken by index in both
  ],
)
def test_matches_loop_transcription(k1, k2, lambda_value, duplicates):
  x, identities = clustered(
    num_identities=25, per_identity=8, dim=16, noise=0.7, seed=k1, duplicates=duplicates
  )
  qf, _, gf, _ = split(x, identities, 50, seed=k2)
  q_g, q_q, g_g = (pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
  got = rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
  want = loop_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
  assert got.shape == (50, x.shape[0] - 50) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_more_neighbours_than_samples_uses_whole_rows():
  x, identities = clustered(num_identities=3, per_identity=4, dim=8, noise=0.5, seed=3)
  qf, _, gf, _ = split(x, identities, 4, seed=0)
  args = (pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
  np.testing.assert_allclose(
    rerank(*args, k1=20, k2=30), loop_rerank(*args, k1=20, k2=30), rtol=0, atol=1e-5
  )


def test_lambda_one_is_the_normalised_original_distance():
  x, identities = clustered(num_identities=6, per_identity=5, dim=8, noise=0.5, seed=1)
  qf, _, gf, _ = split(x, identities, 7, seed=1)
  q_g, q_q, g_g = (pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
  got = rerank(q_g, q_q, g_g, k1=5, k2=2, lambda_value=1.0)
  # Row i of D is column i of the squared stack over that column's maximum.
  col_max = np.maximum((q_q**2).max(axis=0), (q_g**2).max(axis=1))
  np.testing.assert_allclose(got, q_g**2 / col_max[:, None], rtol=1e-6)


def test_rerank_improves_map_on_clustered_data():
  """Identities spread along curved manifolds: neighbours-of-neighbours fix plain L2."""
  rng = np.random.default_rng(0)
  num_identities, per_identity, dim = 40, 12, 32
  identities = np.repeat(np.arange(num_identities), per_identity)
  # Each identity is a random arc: the far ends of an arc are farther apart than the
  # nearest points of other arcs, but linked through the arc's middle.
  starts = rng.normal(size=(num_identities, dim))
  ends = rng.normal(size=(num_identities, dim))
  t = rng.uniform(0, 1, size=identities.size)[:, None]
  x = (
    (1 - t) * starts[identities]
    + t * ends[identities]
    + 0.35 * rng.normal(size=(identities.size, dim))
  )
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  cameras = rng.integers(0, 4, size=identities.size)
  perm = rng.permutation(identities.size)
  q, g = perm[:80], perm[80:]
  q_g = pairwise_distance(x[q], x[g])
  args = (identities[q], identities[g], cameras[q], cameras[g])
  plain = evaluate_ranking(q_g, *args)
  reranked = evaluate_ranking(
    rerank(q_g, pairwise_distance(x[q], x[q]), pairwise_distance(x[g], x[g]), k1=10, k2=3), *args
  )
  assert reranked["mAP"] > plain["mAP"] + 0.03, (plain, reranked)


def test_argument_checks():
  q_g, q_q, g_g = np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3))
  with pytest.raises(ValueError, match="q_q_dist"):
    rerank(q_g, np.zeros((3, 3)), g_g)
  with pytest.raises(ValueError, match="g_g_dist"):
    rerank(q_g, q_q, np.zeros((2, 2)))
  with pytest.raises(ValueError, match="non-empty"):
    rerank(np.zeros((0, 3)), np.zeros((0, 0)), g_g)
  with pytest.raises(ValueError, match="k1"):
    rerank(q_g, q_q, g_g, k1=0)
  with pytest.raises(ValueError, match="k2"):
    rerank(q_g, q_q, g_g, k2=0)
  with pytest.raises(ValueError, match="lambda"):
    rerank(q_g, q_q, g_g, lambda_value=1.5)
  bad = q_g.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    rerank(bad, q_q, g_g)
