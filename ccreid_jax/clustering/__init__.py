"""Pseudo labels on the host: k-reciprocal Jaccard distance, DBSCAN, centroids (numpy/scipy).

Never imports the model (STYLE.md): everything here takes and returns numpy arrays.
"""

from ccreid_jax.clustering.centroids import cluster_centroids, cluster_stats, relabel_consecutive
from ccreid_jax.clustering.dbscan import dbscan_labels
from ccreid_jax.clustering.jaccard import jaccard_distance, knn

__all__ = [
    "cluster_centroids",
    "cluster_stats",
    "dbscan_labels",
    "jaccard_distance",
    "knn",
    "relabel_consecutive",
]
from ccreid_jax.clustering.rlcc import (  # noqa: E402
    consensus_matrix, consensus_stats, keep_outliers_as_singletons, previous_predictions,
    soft_labels)
from ccreid_jax.clustering.infomap import infomap_edges, infomap_labels  # noqa: E402
