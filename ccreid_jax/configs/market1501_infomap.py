"""Cluster Contrast with InfoMap clustering on Market-1501 (kNN 15, cosine >= 0.5, clusters of
at most 4 images dropped, the infomap package's default seed).

Reproduces: 83.0 mAP / 92.9 rank-1, the ResNet-50 InfoMap figure of the Cluster Contrast README
(docs/algorithms.md section 8). Everything else as ``market1501.py`` (ImageNet weights required).
"""

from ccreid_jax.configs import market1501, variants


def get_config():
  return variants.infomap(market1501.get_config())
