"""Cluster Contrast on Market-1501 with IBN-ResNet-50-a, GeM and the hard memory update.

Reproduces: 87.0 mAP / 94.6 rank-1, the run behind the example log of the Cluster Contrast
README (``alibaba/cluster-contrast-reid``; docs/algorithms.md section 8): eps 0.4, 400 steps
per epoch, the hard (least similar sample) memory update. The reference took 2 h 44 min for
it on 4 GPUs.

Weights: IBN-Net's ImageNet IBN-ResNet-50-a (``resnet50_ibn_a.pth.tar``), given with
``--config.model.pretrained=weights/resnet50_ibn_a.pth.tar``.
Precision: as ``market1501.py`` ("default": TF32 convolutions on Ampere / Hopper GPUs).
"""

from ccreid_jax.configs import market1501


def get_config():
  config = market1501.get_config()
  config.model.arch = "resnet50_ibn_a"
  config.memory.update_rule = "hard"
  config.cluster.eps = 0.4
  config.train.iters = 400
  return config
