"""Cluster Contrast on VeRi-776, the published recipe (DBSCAN on the Jaccard distance).

Reproduces: 40.3 mAP / 84.6 rank-1, the ResNet-50 DBSCAN figure of the Cluster Contrast README
(``alibaba/cluster-contrast-reid``; docs/algorithms.md section 8). Batch 256 = 16 pseudo
identities x 16 images, 400 steps per epoch, 50 epochs, eps 0.6, 224x224 images.

Weights (``resnet50-19c8e357.pth``, required) and precision: see configs/default.py.
"""

from ccreid_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "veri776"
  config.data.height = 224
  config.data.width = 224
  config.train.iters = 400
  return config
