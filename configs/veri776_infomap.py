"""Cluster Contrast with InfoMap clustering on veri776 (reference: k 15, similarity 0.5, clusters <= 4 dropped)."""

from configs import veri776


def get_config():
  config = veri776.get_config()
  config.cluster.method = "infomap"
  config.cluster.infomap_k = 15
  config.cluster.infomap_min_similarity = 0.5
  config.cluster.infomap_min_cluster_size = 5
  return config
