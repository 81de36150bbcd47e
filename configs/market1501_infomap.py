"""Cluster Contrast with InfoMap clustering on market1501 (reference: k 15, similarity 0.5, clusters <= 4 dropped)."""

from configs import market1501


def get_config():
  config = market1501.get_config()
  config.cluster.method = "infomap"
  config.cluster.infomap_k = 15
  config.cluster.infomap_min_similarity = 0.5
  config.cluster.infomap_min_cluster_size = 5
  return config
