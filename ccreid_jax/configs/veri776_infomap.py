"""Cluster Contrast with InfoMap clustering on VeRi-776 (kNN 15, cosine >= 0.5, clusters of
at most 4 images dropped, the infomap package's default seed).

Reproduces: 40.8 mAP / 86.2 rank-1, the ResNet-50 InfoMap figure of the Cluster Contrast README
(docs/algorithms.md section 8). Everything else as ``veri776.py`` (ImageNet weights required).
"""

from ccreid_jax.configs import variants, veri776


def get_config():
  return variants.infomap(veri776.get_config())
