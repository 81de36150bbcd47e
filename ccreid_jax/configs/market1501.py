"""Cluster Contrast on Market-1501, the published recipe (DBSCAN on the Jaccard distance).

Reproduces: 82.1 mAP / 92.3 rank-1, the ResNet-50 DBSCAN figure of the Cluster Contrast README
(``alibaba/cluster-contrast-reid``; docs/algorithms.md section 8). Batch 256 = 16 pseudo
identities x 16 images, 200 steps per epoch, 50 epochs, eps 0.6.

Weights (``resnet50-19c8e357.pth``, required) and precision: see configs/default.py.
"""

from ccreid_jax.configs import default


def get_config():
  return default.get_config()  # The defaults are this recipe (data.name "market1501").
