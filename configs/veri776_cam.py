"""Camera-aware Cluster Contrast on VeRi-776: CA-Jaccard pseudo labels.

Reproduces: 43.1 mAP, Cluster Contrast with the CA-Jaccard distance (Chen et al., "CA-Jaccard:
Camera-aware Jaccard Distance for Person Re-identification", CVPR 2024; code
``chenyiyuu/CA-Jaccard``; docs/algorithms.md sections 8 and 9). Its settings: camera-aware
k-reciprocal sets with k1 5 (same camera) and 20 (other cameras), query expansion over 2 + 4
neighbours (3 + 3 in the first epoch), DBSCAN eps 0.6, average pooling; the rest is
``veri776.py`` (ImageNet weights required). The camera-aware proxy loss
(``--config.camera.enabled=True``) can be added on top; no published figure covers the
combination.
"""

from configs import veri776


def get_config():
  config = veri776.get_config()
  config.cluster.distance = "ca_jaccard"
  config.cluster.eps = 0.6
  config.cluster.ca_k1_intra = 5
  config.cluster.ca_k1_inter = 20
  config.cluster.ca_k2_intra = 2
  config.cluster.ca_k2_inter = 4
  config.cluster.ca_k2_intra_first = 3
  config.cluster.ca_k2_inter_first = 3
  config.model.pooling = "avg"
  return config
