"""Cluster Contrast with BMW's memory rewriting on VeRi-776.

Reproduces: 42.1 mAP / 83.2 rank-1, BMW with an ImageNet ResNet-50 (``liu-xb/BMW``, log
``veri-mAP0.421.log``; docs/algorithms.md section 13), the best of the test-set evaluations
(epoch 71; last epoch 42.1 / 83.2). The settings of ``market1501_bmw.py`` with DBSCAN eps 0.7,
256x256 images and batch norm over 128 images, on ``veri776.py`` (400 steps per epoch). The
authors step the optimizer once per two batches of 128 (the gradient of 256 images) and rewrite
the memory after each of them; this recipe takes batches of 256 = 16 x 16 for the same 400
optimizer steps and rewrites the memory once per step (docs/fidelity.md).
"""

from ccreid_jax.configs import variants, veri776


def get_config():
  config = variants.bmw(veri776.get_config())
  config.cluster.eps = 0.7
  config.data.height = 256
  config.data.width = 256
  config.model.bn_group_size = 128
  return config
