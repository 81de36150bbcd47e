"""Camera-aware Cluster Contrast on Market-1501: CA-Jaccard pseudo labels.

Reproduces: 84.8 mAP (its Cluster Contrast baseline: 81.0), Cluster Contrast with the CA-Jaccard distance (Chen et al., "CA-Jaccard:
Camera-aware Jaccard Distance for Person Re-identification", CVPR 2024; code
``chenyiyuu/CA-Jaccard``; docs/algorithms.md sections 8 and 9). Its settings: camera-aware
k-reciprocal sets with k1 5 (same camera) and 20 (other cameras), query expansion over 2 + 4
neighbours (3 + 3 in the first epoch), DBSCAN eps 0.4, average pooling; the rest is
``market1501.py`` (ImageNet weights required). The camera-aware proxy loss
(``--config.camera.enabled=True``) can be added on top; no published figure covers the
combination.
"""

from ccreid_jax.configs import market1501


def ca_jaccard_recipe(config, eps):
  """The CA-Jaccard paper's settings on top of a dataset config, with its DBSCAN radius."""
  config.cluster.distance = "ca_jaccard"
  config.cluster.eps = eps
  config.cluster.ca_k1_intra = 5
  config.cluster.ca_k1_inter = 20
  config.cluster.ca_k2_intra = 2
  config.cluster.ca_k2_inter = 4
  config.cluster.ca_k2_intra_first = 3
  config.cluster.ca_k2_inter_first = 3
  config.model.pooling = "avg"
  return config


def get_config():
  return ca_jaccard_recipe(market1501.get_config(), eps=0.4)
