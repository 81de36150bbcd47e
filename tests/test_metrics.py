"""Re-ID ranking metrics against hand-worked numbers and a per-query loop with sklearn AP."""

import numpy as np
import pytest

import reference_impls as ref
from ccreid_jax.evaluation import evaluate_ranking, pairwise_distance


def test_hand_worked_example():
  gallery_ids = np.array([1, 2, 1, 3, 1])
  gallery_cams = np.array([0, 1, 1, 1, 1])
  dist = np.array([
      # Query id 1, cam 0: gallery 0 (same id, same cam) is dropped; the kept ranking is
      # g1 (id 2), g2 (id 1), g3 (id 3), g4 (id 1): AP = (1/2 + 2/4) / 2 = 0.5, first hit 2.
      [0.1, 0.2, 0.3, 0.4, 0.5],
      # Query id 2, cam 0: g1 (id 2, cam 1) comes first: AP = 1, first hit 1.
      [0.5, 0.1, 0.2, 0.3, 0.4],
      # Query id 9: no match anywhere, skipped.
      [0.1, 0.2, 0.3, 0.4, 0.5],
      # Query id 3, cam 1: its only match (g3) has the same camera: skipped.
      [0.4, 0.3, 0.2, 0.1, 0.5],
  ])
  out = evaluate_ranking(dist, np.array([1, 2, 9, 3]), gallery_ids, np.array([0, 0, 0, 1]),
                         gallery_cams, topk=(1, 2, 5))
  assert out == pytest.approx({"mAP": 0.75, "rank1": 0.5, "rank2": 1.0, "rank5": 1.0})


def test_tied_distances_follow_sklearn():
  # Sorted: g2 (id 2) at 0.1, then g0 (id 1) and g1 (id 2) tied at 0.2. sklearn groups the
  # tie into one threshold: the precision there is 1/3, so AP = 1/3 (not 1/2). The stable
  # order puts g0 second: first correct match at rank 2.
  out = evaluate_ranking(np.array([[0.2, 0.2, 0.1]]), np.array([1]), np.array([1, 2, 2]),
                         np.array([0]), np.array([1, 1, 1]), topk=(1, 2))
  assert out["mAP"] == pytest.approx(1 / 3)
  assert out["rank1"] == 0.0 and out["rank2"] == 1.0
  # Same-id same-camera entries inside a tie group are removed before grouping.
  out = evaluate_ranking(np.array([[0.2, 0.2, 0.2, 0.1]]), np.array([1]),
                         np.array([1, 1, 2, 2]), np.array([0]), np.array([1, 0, 1, 1]))
  assert out["mAP"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_elements", [1, 97, 1 << 22])
def test_matches_loop_with_sklearn_ap(seed, block_elements):
  rng = np.random.default_rng(seed)
  num_q, num_g = 40, 70
  levels = [3, 8, 1000][seed % 3]  # few distinct distances -> many ties
  dist = (rng.integers(0, levels, size=(num_q, num_g)) / levels).astype(np.float32)
  q_ids, g_ids = rng.integers(0, 8, num_q), rng.integers(0, 8, num_g)
  q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
  topk = (1, 3, 5, 10)
  got = evaluate_ranking(dist, q_ids, g_ids, q_cams, g_cams, topk=topk,
                         block_elements=block_elements)
  want = ref.evaluate_loop(dist, q_ids, g_ids, q_cams, g_cams, topk=topk)
  assert set(got) == {"mAP", "rank1", "rank3", "rank5", "rank10"}
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert isinstance(got[key], float)


def test_queries_without_valid_match_are_skipped():
  rng = np.random.default_rng(0)
  dist = rng.random((6, 9))
  q_ids, g_ids = rng.integers(0, 3, 6), rng.integers(0, 3, 9)
  q_cams, g_cams = np.zeros(6, int), np.ones(9, int)
  base = evaluate_ranking(dist, q_ids, g_ids, q_cams, g_cams)
  # Extra queries: an unseen id, and an id whose only gallery match shares its camera.
  g_ids2 = np.append(g_ids, 77)
  g_cams2 = np.append(g_cams, 5)
  # The new gallery entry (id 77) ranks last for the old queries: a trailing non-match
  # changes neither their AP nor their CMC.
  dist2 = np.vstack([np.hstack([dist, np.full((6, 1), 10.0)]), rng.random((2, 10))])
  out = evaluate_ranking(dist2, np.append(q_ids, [99, 77]), g_ids2, np.append(q_cams, [0, 5]),
                         g_cams2)
  assert out == pytest.approx(base)


def test_no_valid_query_raises():
  with pytest.raises(ValueError, match="no query has a valid match"):
    evaluate_ranking(np.zeros((2, 2)), np.array([1, 2]), np.array([1, 2]), np.array([0, 1]),
                     np.array([0, 1]))


def test_pairwise_distance():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(13, 10)).astype(np.float32)
  g = rng.normal(size=(17, 10)).astype(np.float32)
  got = pairwise_distance(q, g, block_size=4)
  assert got.dtype == np.float32 and got.shape == (13, 17)
  np.testing.assert_allclose(got, ref.squared_euclidean(q, g), rtol=1e-5, atol=1e-4)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  np.testing.assert_allclose(pairwise_distance(qn, gn), 2 - 2 * qn @ gn.T, atol=1e-5)
