"""Cluster Contrast with InfoMap clustering on MSMT17 (kNN 15, cosine >= 0.5, clusters of
at most 4 images dropped, the infomap package's default seed).

Reproduces: 31.2 mAP / 61.5 rank-1, the ResNet-50 InfoMap figure of the Cluster Contrast README
(docs/algorithms.md section 8). Everything else as ``msmt17.py`` (ImageNet weights required).
"""

from ccreid_jax.configs import msmt17, variants


def get_config():
  return variants.infomap(msmt17.get_config())
