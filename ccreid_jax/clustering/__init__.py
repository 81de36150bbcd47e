"""Pseudo labels on the host: k-reciprocal Jaccard distance, DBSCAN, InfoMap, centroids, RLCC.

Never imports the model: everything here takes and returns numpy arrays.
"""

from ccreid_jax.clustering.ca_jaccard import ca_jaccard_distance
from ccreid_jax.clustering.centroids import cluster_centroids, cluster_stats, relabel_consecutive
from ccreid_jax.clustering.dbscan import dbscan_labels
from ccreid_jax.clustering.infomap import infomap_edges, infomap_labels
from ccreid_jax.clustering.jaccard import jaccard_distance, knn
from ccreid_jax.clustering.reliable import reliable_dbscan_labels
from ccreid_jax.clustering.rlcc import (
  consensus_matrix,
  consensus_stats,
  keep_outliers_as_singletons,
  previous_predictions,
  soft_labels,
)

__all__ = [
  "ca_jaccard_distance",
  "cluster_centroids",
  "cluster_stats",
  "consensus_matrix",
  "consensus_stats",
  "dbscan_labels",
  "infomap_edges",
  "infomap_labels",
  "jaccard_distance",
  "keep_outliers_as_singletons",
  "knn",
  "previous_predictions",
  "relabel_consecutive",
  "reliable_dbscan_labels",
  "soft_labels",
]
