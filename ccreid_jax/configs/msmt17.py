"""Cluster Contrast on MSMT17, the published recipe (DBSCAN on the Jaccard distance).

Reproduces: 27.6 mAP / 56.0 rank-1, the ResNet-50 DBSCAN figure of the Cluster Contrast README
(``alibaba/cluster-contrast-reid``; docs/algorithms.md section 8). Batch 256 = 16 pseudo
identities x 16 images, 400 steps per epoch, 50 epochs, eps 0.6.

Weights (``resnet50-19c8e357.pth``, required) and precision: see configs/default.py.
"""

from ccreid_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "msmt17"
  config.train.iters = 400
  return config
