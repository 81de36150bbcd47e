"""Re-ID ranking metrics against hand-worked numbers, a per-query loop with sklearn AP, and a
brute-force transcription of mINP's definition."""

import numpy as np
import pytest

from ccreid_jax.evaluation import evaluate_ranking, pairwise_distance

import reference_impls as ref


def minp_by_definition(
  distmat, query_identities, gallery_identities, query_cameras, gallery_cameras
):
  """mINP straight from its definition, one query at a time, without sorting.

  Per query: drop the gallery entries with its identity and camera; skip it if no correct match
  is left; INP = (correct matches) / (rank of the last correct match), where a tied rank counts
  every kept entry at a distance <= the last correct match's (the AP code's tie rule).
  """
  inps = []
  for i in range(distmat.shape[0]):
    kept = ~((gallery_identities == query_identities[i]) & (gallery_cameras == query_cameras[i]))
    d = distmat[i][kept]
    correct = gallery_identities[kept] == query_identities[i]
    if not correct.any():
      continue
    hardest = d[correct].max()
    inps.append(correct.sum() / np.sum(d <= hardest))
  return float(np.mean(inps))


def test_hand_worked_example():
  gallery_identities = np.array([1, 2, 1, 3, 1])
  gallery_cameras = np.array([0, 1, 1, 1, 1])
  dist = np.array(
    [
      # Query identity 1, camera 0: gallery 0 (same identity, same camera) is dropped; the kept
      # ranking is g1 (identity 2), g2 (identity 1), g3 (identity 3), g4 (identity 1):
      # AP = (1/2 + 2/4) / 2 = 0.5, first hit 2, INP = 2 correct / last one at rank 4 = 0.5.
      [0.1, 0.2, 0.3, 0.4, 0.5],
      # Query identity 2, camera 0: g1 (identity 2, camera 1) comes first: AP = 1, first hit 1,
      # INP = 1.
      [0.5, 0.1, 0.2, 0.3, 0.4],
      # Query identity 9: no match anywhere, skipped.
      [0.1, 0.2, 0.3, 0.4, 0.5],
      # Query identity 3, camera 1: its only match (g3) has the same camera: skipped.
      [0.4, 0.3, 0.2, 0.1, 0.5],
    ]
  )
  out = evaluate_ranking(
    dist,
    np.array([1, 2, 9, 3]),
    gallery_identities,
    np.array([0, 0, 0, 1]),
    gallery_cameras,
    topk=(1, 2, 5),
  )
  assert out == pytest.approx({"mAP": 0.75, "mINP": 0.75, "rank1": 0.5, "rank2": 1.0, "rank5": 1.0})


def test_tied_distances_follow_sklearn():
  # Sorted: g2 (identity 2) at 0.1, then g0 (identity 1) and g1 (identity 2) tied at 0.2.
  # sklearn groups the tie into one threshold: the precision there is 1/3, so AP = 1/3 (not
  # 1/2). The stable order puts g0 second: first correct match at rank 2.
  out = evaluate_ranking(
    np.array([[0.2, 0.2, 0.1]]),
    np.array([1]),
    np.array([1, 2, 2]),
    np.array([0]),
    np.array([1, 1, 1]),
    topk=(1, 2),
  )
  assert out["mAP"] == pytest.approx(1 / 3)
  assert out["rank1"] == 0.0 and out["rank2"] == 1.0
  # The one correct match ranks at the end of its tie group (3), as for AP: INP = 1/3.
  assert out["mINP"] == pytest.approx(1 / 3)
  # Same-identity same-camera entries inside a tie group are removed before grouping.
  out = evaluate_ranking(
    np.array([[0.2, 0.2, 0.2, 0.1]]),
    np.array([1]),
    np.array([1, 1, 2, 2]),
    np.array([0]),
    np.array([1, 0, 1, 1]),
  )
  assert out["mAP"] == pytest.approx(1 / 3)
  assert out["mINP"] == pytest.approx(1 / 3)


def test_minp_hand_worked():
  # One query (identity 1, camera 0) against 6 entries, sorted by distance: g0 (identity 1,
  # camera 0: removed), g1 (identity 1, camera 1: correct, rank 1), g2 (identity 5), g3
  # (identity 1, camera 2: correct, rank 3), g4 (identity 6), g5 (identity 1, camera 0:
  # removed). INP = 2 / 3; AP = (1/1 + 2/3) / 2 = 5/6.
  dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  out = evaluate_ranking(
    dist, np.array([1]), np.array([1, 1, 5, 1, 6, 1]), np.array([0]), np.array([0, 1, 1, 2, 1, 0])
  )
  assert out["mINP"] == pytest.approx(2 / 3)
  assert out["mAP"] == pytest.approx(5 / 6)
  # The last correct match tied with a wrong one that the stable order puts after it (g4 at
  # 0.3): the tie counts, INP = 2 / 4 (the rank by position alone would give 2 / 3).
  dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.3, 0.5]])
  out = evaluate_ranking(
    dist, np.array([1]), np.array([1, 1, 5, 1, 6, 1]), np.array([0]), np.array([0, 1, 1, 2, 1, 0])
  )
  assert out["mINP"] == pytest.approx(2 / 4)
  # INP is 1 exactly when every correct match precedes every wrong one.
  dist = np.array([[0.0, 0.1, 0.4, 0.3, 0.5, 0.2]])
  out = evaluate_ranking(
    dist, np.array([1]), np.array([1, 1, 5, 1, 6, 1]), np.array([0]), np.array([0, 1, 1, 2, 1, 0])
  )
  assert out["mINP"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_elements", [1, 97, 1 << 22])
def test_matches_loop_with_sklearn_ap(seed, block_elements):
  rng = np.random.default_rng(seed)
  num_q, num_g = 40, 70
  levels = [3, 8, 1000][seed % 3]  # few distinct distances -> many ties
  dist = (rng.integers(0, levels, size=(num_q, num_g)) / levels).astype(np.float32)
  q_identities, g_identities = rng.integers(0, 8, num_q), rng.integers(0, 8, num_g)
  q_cameras, g_cameras = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
  topk = (1, 3, 5, 10)
  got = evaluate_ranking(
    dist, q_identities, g_identities, q_cameras, g_cameras, topk=topk, block_elements=block_elements
  )
  want = ref.evaluate_loop(dist, q_identities, g_identities, q_cameras, g_cameras, topk=topk)
  assert set(got) == {"mAP", "mINP", "rank1", "rank3", "rank5", "rank10"}
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert isinstance(got[key], float)
  assert isinstance(got["mINP"], float)
  assert got["mINP"] == pytest.approx(
    minp_by_definition(dist, q_identities, g_identities, q_cameras, g_cameras), abs=1e-12
  )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_elements", [1, 1 << 22])
def test_minp_matches_definition_with_ties_and_unmatched_queries(seed, block_elements):
  rng = np.random.default_rng(100 + seed)
  num_q, num_g = 30, 50
  levels = [2, 4, 16, 10000][seed]  # few distinct distances -> many ties
  dist = (rng.integers(0, levels, size=(num_q, num_g)) / levels).astype(np.float32)
  # Query identities 6 and 7 never occur in the gallery, and with 2 cameras many queries see
  # their only matches removed: both kinds of query are skipped.
  q_identities, g_identities = rng.integers(0, 8, num_q), rng.integers(0, 6, num_g)
  q_cameras, g_cameras = rng.integers(0, 2, num_q), rng.integers(0, 2, num_g)
  got = evaluate_ranking(
    dist, q_identities, g_identities, q_cameras, g_cameras, block_elements=block_elements
  )
  want = minp_by_definition(dist, q_identities, g_identities, q_cameras, g_cameras)
  assert got["mINP"] == pytest.approx(want, abs=1e-12)
  assert (q_identities >= 6).any()


def test_queries_without_valid_match_are_skipped():
  rng = np.random.default_rng(0)
  dist = rng.random((6, 9))
  q_identities, g_identities = rng.integers(0, 3, 6), rng.integers(0, 3, 9)
  q_cameras, g_cameras = np.zeros(6, int), np.ones(9, int)
  base = evaluate_ranking(dist, q_identities, g_identities, q_cameras, g_cameras)
  # Extra queries: an unseen identity, and an identity whose only gallery match shares its camera.
  g_identities2 = np.append(g_identities, 77)
  g_cameras2 = np.append(g_cameras, 5)
  # The new gallery entry (identity 77) ranks last for the old queries: a trailing non-match
  # changes neither their AP nor their CMC.
  dist2 = np.vstack([np.hstack([dist, np.full((6, 1), 10.0)]), rng.random((2, 10))])
  out = evaluate_ranking(
    dist2,
    np.append(q_identities, [99, 77]),
    g_identities2,
    np.append(q_cameras, [0, 5]),
    g_cameras2,
  )
  assert out == pytest.approx(base)


def test_no_valid_query_raises():
  with pytest.raises(ValueError, match="no query has a valid match"):
    evaluate_ranking(
      np.zeros((2, 2)), np.array([1, 2]), np.array([1, 2]), np.array([0, 1]), np.array([0, 1])
    )


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
