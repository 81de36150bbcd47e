"""Cluster Contrast with BMW's memory rewriting on DukeMTMC-reID.

Reproduces: 75.2 mAP / 86.0 rank-1, BMW with an ImageNet ResNet-50 (``liu-xb/BMW``, log
``duke-mAP0.752.log``; docs/algorithms.md section 13), the best of the test-set evaluations
(epoch 70; last epoch 75.1 / 85.7; the log continues an earlier run from its best checkpoint).
The settings of ``market1501_bmw.py`` with DBSCAN eps 0.7, on ``dukemtmcreid.py``.
"""

from ccreid_jax.configs import dukemtmcreid, variants


def get_config():
  config = variants.bmw(dukemtmcreid.get_config())
  config.cluster.eps = 0.7
  return config
