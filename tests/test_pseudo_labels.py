"""The epoch's pseudo-labelling phase: label-free statistics and what one epoch hands on."""

import collections

import numpy as np
import pytest

from ccreid_jax import clustering, pseudo_labels

from conftest import tiny_config


def _loop_stats(features, labels):
  """The statistics by hand: Python counts and per-sample loops."""
  sizes = collections.Counter(int(label) for label in labels if label >= 0)
  bins = {"1": 0, "2-3": 0, "4-7": 0, "8-15": 0, "16-31": 0, "32-63": 0, "64+": 0}
  for size in sizes.values():
    for name, (lo, hi) in {
      "1": (1, 1),
      "2-3": (2, 3),
      "4-7": (4, 7),
      "8-15": (8, 15),
      "16-31": (16, 31),
      "32-63": (32, 63),
      "64+": (64, 10**9),
    }.items():
      if lo <= size <= hi:
        bins[name] += 1
  cosines = []
  for i, label in enumerate(labels):
    if label >= 0 and sizes[int(label)] > 1:
      members = features[labels == label].astype(np.float64)
      centre = members.mean(axis=0)
      cosines.append(features[i] @ (centre / np.linalg.norm(centre)))
  outliers = sum(1 for label in labels if label < 0 or sizes[int(label)] == 1)
  return outliers, max(sizes.values()), bins, float(np.mean(cosines))


def test_label_stats_by_hand():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(150, 8)).astype(np.float32)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  labels = np.concatenate(
    [
      np.full(70, 0),
      np.full(33, 1),
      np.full(9, 2),
      np.full(5, 3),
      np.full(2, 4),
      [5, 6],
      np.full(29, -1),
    ]
  )
  labels = labels[rng.permutation(labels.size)]
  stats = pseudo_labels.label_stats(
    features, labels, clustering.cluster_centroids(features, labels)
  )
  outliers, largest, bins, similarity = _loop_stats(features, labels)
  assert stats["outliers"] == outliers == 31
  assert stats["largest_cluster"] == largest == 70
  assert stats["cluster_sizes"] == bins
  assert stats["intra_similarity"] == pytest.approx(similarity, abs=1e-6)


def _clustered(seed=0, n=60):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(6, 16))
  x = centres[np.arange(n) % 6] + 0.3 * rng.normal(size=(n, 16))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.arange(n) % 6


def test_pseudo_label_plan_and_reliability_threshold_handed_on():
  """The plan's labels are the clustering's; the reliability threshold computed in the first
  epoch is handed to the next one, which reuses it instead of computing its own."""
  features, identities = _clustered()
  config = tiny_config("unused")
  config.cluster.k1, config.cluster.k2 = 10, 3
  config.cluster.reliable = True
  config.cluster.eps_tight, config.cluster.eps, config.cluster.eps_loose = 0.5, 0.55, 0.6
  config.rlcc.outliers_as_singletons = True
  first = pseudo_labels.pseudo_label(
    features, np.zeros(60, int), config, epoch=0, previous=None, true_identities=identities
  )
  distance = clustering.jaccard_distance(features, k1=10, k2=3, max_distance=0.6)
  labels, threshold = clustering.reliable_dbscan_labels(distance, eps=(0.5, 0.55, 0.6))
  np.testing.assert_array_equal(first.labels, labels)
  assert first.generation.indep_threshold == threshold
  assert first.num_clusters == labels.max() + 1 and first.stats["clusters"] == first.num_clusters
  assert 0.0 <= first.stats["cluster_ari"] <= 1.0
  sentinel = pseudo_labels.Generation(first.labels, first.centroids, indep_threshold=-1.0)
  second = pseudo_labels.pseudo_label(
    features, np.zeros(60, int), config, epoch=1, previous=sentinel
  )
  assert second.generation.indep_threshold == -1.0  # reused, not recomputed
  every_split, _ = clustering.reliable_dbscan_labels(
    distance, eps=(0.5, 0.55, 0.6), indep_threshold=-1.0
  )
  np.testing.assert_array_equal(second.labels, every_split)


def test_camera_stats_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, -1, -1])
  cameras = np.array([0, 0, 0, 1, 2, 3, 3, 3, 1, 0, 1])
  stats = pseudo_labels.camera_stats(labels, cameras)
  # Classes of two or more: 0 (one camera), 1 (two cameras), 2 (one camera); 3 is a singleton.
  assert stats["one_camera_clusters"] == pytest.approx(2 / 3)
  from sklearn.metrics import adjusted_rand_score

  assert stats["camera_ari"] == pytest.approx(adjusted_rand_score(cameras, labels))
  assert np.isnan(
    pseudo_labels.camera_stats(np.array([-1, 0]), np.array([0, 1]))["one_camera_clusters"]
  )
