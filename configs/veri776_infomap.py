"""Cluster Contrast with InfoMap clustering on VeRi-776 (kNN 15, cosine >= 0.5, clusters of
at most 4 images dropped, the infomap package's default seed).

Reproduces: 40.8 mAP / 86.2 rank-1, the ResNet-50 InfoMap figure of the Cluster Contrast README
(docs/algorithms.md section 8). Everything else as ``veri776.py`` (ImageNet weights required).
"""

from ccreid_jax.configs import veri776


def get_config():
  config = veri776.get_config()
  config.cluster.method = "infomap"
  config.cluster.infomap_k = 15
  config.cluster.infomap_min_similarity = 0.5
  config.cluster.infomap_min_cluster_size = 5
  config.cluster.infomap_seed = 0
  return config
