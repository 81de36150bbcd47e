"""Camera-aware Cluster Contrast on Market-1501: CA-Jaccard pseudo labels.

Reproduces: 84.8 mAP (its Cluster Contrast baseline: 81.0), Cluster Contrast with the CA-Jaccard
distance (Chen et al., "CA-Jaccard: Camera-aware Jaccard Distance for Person Re-identification",
CVPR 2024; code ``chenyiyuu/CA-Jaccard``; docs/algorithms.md sections 8 and 9). Its settings:
camera-aware k-reciprocal sets with k1 5 (same camera) and 20 (other cameras), query expansion over
2 + 4 neighbours (3 + 3 in the first epoch), DBSCAN eps 0.4, average pooling; the rest is
``market1501.py`` (ImageNet weights required). The camera-aware proxy loss
(``--config.camera.enabled=True``) can be added on top; no published figure covers the combination.
"""

from ccreid_jax.configs import market1501, variants


def get_config():
  config = variants.ca_jaccard(market1501.get_config())
  config.cluster.eps = 0.4
  return config
