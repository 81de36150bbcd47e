"""Pseudo-labelling, one epoch's first phase: train features -> labels, centroids, targets.

``pseudo_label(features, cameras, config, epoch=..., previous=...)`` clusters the L2-normalised
train features (docs/algorithms.md sections 5, 9 and 10), builds the cluster centroids that
become the memory, the RLCC soft targets when RLCC is on (section 6), and the statistics an
epoch logs. It is host-side numpy / scikit-learn code and never touches the model.

What one epoch hands to the next is a ``Generation``: its labels and clustering centroids
(RLCC's previous clustering) and the reliability criterion's independence threshold (fixed by
the first epoch). Checkpoints carry it, so a resumed run labels exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import ml_collections
import numpy as np
from sklearn.metrics import adjusted_rand_score

from ccreid_jax import camera_memory, clustering

__all__ = [
  "Generation",
  "PseudoLabels",
  "camera_stats",
  "cluster_distance",
  "cluster_labels",
  "label_stats",
  "pseudo_label",
  "rlcc_targets",
]


@dataclasses.dataclass(frozen=True)
class Generation:
  """One epoch's clustering, as the next epoch needs it.

  Attributes:
    labels: (N,) int64 class of each train sample; -1 marks an outlier.
    centroids: (K, D) float32 L2-normalised class means (the clustering centroids, not the
      momentum-updated memory).
    indep_threshold: the reliability criterion's independence threshold (computed in the
      first epoch and reused by every later one), or None when the criterion is off.
  """

  labels: np.ndarray
  centroids: np.ndarray
  indep_threshold: float | None = None

  @property
  def num_clusters(self) -> int:
    return int(self.centroids.shape[0])


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
  """What an epoch trains on.

  Attributes:
    generation: labels and centroids of this epoch's clustering (``num_clusters`` may be 0,
      then there is nothing to train on).
    targets: (N, K) float32 RLCC soft targets, or None for the hard cross-entropy.
    stats: plain numbers for the epoch's record: ``clusters``, ``outliers``, ``cluster_ari``
      (agreement with the true identities, a diagnostic when they are known), ``rlcc_*`` and
      ``camera_proxies``.
    camera: the camera-aware proxies of this clustering (``camera.enabled`` from
      ``camera.start_epoch`` on), or None.
  """

  generation: Generation
  targets: np.ndarray | None
  stats: dict[str, Any]
  camera: camera_memory.CameraProxyState | None = None

  @property
  def labels(self) -> np.ndarray:
    return self.generation.labels

  @property
  def centroids(self) -> np.ndarray:
    return self.generation.centroids

  @property
  def num_clusters(self) -> int:
    return self.generation.num_clusters


CLUSTER_METHODS = ("dbscan", "infomap")
CLUSTER_DISTANCES = ("jaccard", "ca_jaccard")


def cluster_distance(
  features: np.ndarray,
  cameras: np.ndarray | None,
  cluster: ml_collections.ConfigDict,
  *,
  epoch: int,
  max_distance: float,
):
  """The sparse distance DBSCAN clusters at ``epoch``: Jaccard, or CA-Jaccard (with its
  first-epoch query expansion in epoch 0), storing the pairs up to ``max_distance``."""
  if cluster.distance == "ca_jaccard":
    if cameras is None:  # validation refuses it: data.cameras="none"
      raise ValueError("cluster.distance='ca_jaccard' needs the cameras.")
    first = epoch == 0
    return clustering.ca_jaccard_distance(
      features,
      cameras,
      k1_intra=cluster.ca_k1_intra,
      k1_inter=cluster.ca_k1_inter,
      k2_intra=cluster.ca_k2_intra_first if first else cluster.ca_k2_intra,
      k2_inter=cluster.ca_k2_inter_first if first else cluster.ca_k2_inter,
      max_distance=max_distance,
    )
  return clustering.jaccard_distance(
    features, k1=cluster.k1, k2=cluster.k2, max_distance=max_distance
  )


def cluster_labels(
  features: np.ndarray,
  cameras: np.ndarray | None,
  cluster: ml_collections.ConfigDict,
  *,
  epoch: int,
  outliers_as_singletons: bool = False,
  indep_threshold: float | None = None,
) -> tuple[np.ndarray, float | None]:
  """``(labels, indep_threshold)`` of the configured clustering; -1 marks outliers.

  DBSCAN on the Jaccard or CA-Jaccard distance (with SpCL's reliability criterion when
  ``cluster.reliable``), or InfoMap on the kNN graph. Only pairs within the largest DBSCAN
  radius are stored. ``epoch`` selects CA-Jaccard's first-epoch query expansion.
  """
  if cluster.method == "infomap":
    seed = int(cluster.infomap_seed) or None  # 0: the infomap package's own default.
    labels = clustering.infomap_labels(
      features,
      k=cluster.infomap_k,
      min_similarity=cluster.infomap_min_similarity,
      min_cluster_size=cluster.infomap_min_cluster_size,
      seed=seed,
    )
  elif cluster.method == "dbscan":
    radius = cluster.eps_loose if cluster.reliable else cluster.eps
    distance = cluster_distance(features, cameras, cluster, epoch=epoch, max_distance=radius)
    if cluster.reliable:
      return clustering.reliable_dbscan_labels(
        distance,
        eps=(cluster.eps_tight, cluster.eps, cluster.eps_loose),
        min_samples=cluster.min_samples,
        outliers_as_singletons=outliers_as_singletons,
        indep_threshold=indep_threshold,
      )
    labels = clustering.dbscan_labels(distance, eps=cluster.eps, min_samples=cluster.min_samples)
  else:
    raise ValueError(
      f"config.cluster.method: unknown method {cluster.method!r}; accepted: "
      f"{', '.join(map(repr, CLUSTER_METHODS))}"
    )
  if outliers_as_singletons:
    labels = clustering.keep_outliers_as_singletons(labels)
  return labels, indep_threshold


# Upper ends of the cluster-size histogram's bins (a size s falls in the first bin >= s).
SIZE_BINS = (1, 3, 7, 15, 31, 63)


def label_stats(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> dict[str, Any]:
  """What can be known about a clustering without ground truth.

  ``outliers``: samples in no class of two or more (-1, and singleton classes);
  ``largest_cluster``: its size; ``cluster_sizes``: how many classes have 1, 2-3, 4-7, 8-15,
  16-31, 32-63 and 64 or more members; ``intra_similarity``: the mean cosine between a
  clustered sample and its class centroid (1 = tight clusters), over classes of two or more.
  """
  kept = labels >= 0
  sizes = np.bincount(labels[kept]) if kept.any() else np.zeros(0, np.int64)
  sizes = sizes[sizes > 0]
  edges = (0,) + SIZE_BINS + (np.iinfo(np.int64).max,)
  names = [
    f"{lo + 1}-{hi}" if hi > lo + 1 else str(hi) for lo, hi in itertools.pairwise(edges[:-1])
  ]
  names.append(f"{SIZE_BINS[-1] + 1}+")
  counts = np.histogram(sizes, bins=np.array(edges, dtype=np.float64) + 0.5)[0]
  multi = kept.copy()
  multi[kept] = sizes[np.searchsorted(np.unique(labels[kept]), labels[kept])] > 1
  similarity = (
    float(np.mean(np.sum(features[multi] * centroids[labels[multi]], axis=1)))
    if multi.any()
    else float("nan")
  )
  return {
    "outliers": int(labels.size - multi.sum()),
    "largest_cluster": int(sizes.max()) if sizes.size else 0,
    "cluster_sizes": dict(zip(names, counts.tolist())),
    "intra_similarity": similarity,
  }


def camera_stats(labels: np.ndarray, cameras: np.ndarray) -> dict[str, float]:
  """How much a clustering follows the cameras (diagnostics; camera shift makes it high).

  ``camera_ari``: adjusted Rand index of the labels against the cameras;
  ``one_camera_clusters``: the share of classes of two or more whose members all come from
  one camera (nan without such a class).
  """
  kept = labels >= 0
  pairs = np.unique(np.stack([labels[kept], cameras[kept]], axis=1), axis=0)
  classes, cameras_per_class = np.unique(pairs[:, 0], return_counts=True)
  sizes = np.bincount(labels[kept], minlength=int(labels.max()) + 1 if kept.any() else 0)
  multi = sizes[classes] > 1
  return {
    "camera_ari": float(adjusted_rand_score(cameras, labels)),
    "one_camera_clusters": (
      float(np.mean(cameras_per_class[multi] == 1)) if multi.any() else float("nan")
    ),
  }


def pseudo_label(
  features: np.ndarray,
  cameras: np.ndarray | None,
  config: ml_collections.ConfigDict,
  *,
  epoch: int,
  previous: Generation | None,
  true_identities: np.ndarray | None = None,
) -> PseudoLabels:
  """Clusters ``features`` (N, D) and builds what the epoch trains on.

  Args:
    features: (N, D) L2-normalised train features (eval mode).
    cameras: (N,) cameras (CA-Jaccard needs them), or None.
    config: the run's config (``cluster`` and ``rlcc`` are read).
    epoch: the 0-based epoch (RLCC mixes the previous one-hot from epoch 2 on).
    previous: the previous epoch's ``Generation`` (None in the first epoch, or when it
      found no cluster).
    true_identities: (N,) ground-truth identities for the ``cluster_ari`` diagnostic (never
      used for training), or None.
  """
  rlcc = config.rlcc
  labels, indep_threshold = cluster_labels(
    features,
    cameras,
    config.cluster,
    epoch=epoch,
    outliers_as_singletons=bool(rlcc.outliers_as_singletons),
    indep_threshold=None if previous is None else previous.indep_threshold,
  )
  num_clusters = int(labels.max()) + 1 if labels.size else 0
  centroids = (
    clustering.cluster_centroids(features, labels)
    if num_clusters
    else np.zeros((0, features.shape[1]), np.float32)
  )
  generation = Generation(
    labels=labels,
    centroids=centroids,
    indep_threshold=None if indep_threshold is None else float(indep_threshold),
  )
  stats: dict[str, Any] = {
    "clusters": num_clusters,
    **label_stats(features, labels, generation.centroids),
  }
  if true_identities is not None:
    stats["cluster_ari"] = float(adjusted_rand_score(true_identities, labels))
  if cameras is not None:
    stats.update(camera_stats(labels, cameras))
  targets = None
  if rlcc.enabled and num_clusters and previous is not None and previous.num_clusters:
    targets, rlcc_stats = rlcc_targets(features, generation, previous, rlcc, epoch)
    stats.update({f"rlcc_{k}": v for k, v in rlcc_stats.items()})
  camera = None
  if config.camera.enabled and epoch >= config.camera.start_epoch and num_clusters:
    if cameras is None:  # validation refuses it: data.cameras="none"
      raise ValueError("camera.enabled needs the cameras.")
    camera, _ = camera_memory.build_camera_proxies(
      features, labels, cameras, min_bucket=config.camera.min_bucket
    )
    stats["camera_proxies"] = int(camera.num_proxies)
  return PseudoLabels(generation=generation, targets=targets, stats=stats, camera=camera)


def rlcc_targets(
  features: np.ndarray,
  current: Generation,
  previous: Generation,
  rlcc: ml_collections.ConfigDict,
  epoch: int,
) -> tuple[np.ndarray, dict]:
  """RLCC soft targets (N, K) for this epoch and the consensus statistics to log.

  ``P = q`` on the first RLCC epoch (epoch 1), alpha-mixed with the previous one-hot from
  epoch 2 on (docs/algorithms.md section 6).
  """
  consensus = clustering.consensus_matrix(
    previous.labels,
    current.labels,
    num_prev_clusters=previous.num_clusters,
    num_clusters=current.num_clusters,
  )
  targets = clustering.soft_labels(
    features,
    current.labels,
    previous.labels,
    previous.centroids,
    use_prev_onehot=epoch >= 2,
    alpha=rlcc.alpha,
    beta=rlcc.beta,
    pred_temp=rlcc.pred_temp,
    consensus=consensus,
  )
  stats = clustering.consensus_stats(
    previous.labels,
    current.labels,
    targets,
    num_prev_clusters=previous.num_clusters,
    consensus=consensus,
  )
  return targets, stats
