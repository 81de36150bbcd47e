"""Cluster Contrast with BMW's memory rewriting on Market-1501.

Reproduces: 86.3 mAP / 94.2 rank-1, BMW with an ImageNet ResNet-50 (Liu et al., "BMW:
Bidirectionally Memory bank reWriting for Unsupervised Person Re-Identification", NeurIPS 2025;
code ``liu-xb/BMW``, log ``market-mAP0.863.log``; docs/algorithms.md section 13). That figure is
the best of 75 evaluations on the test set (epoch 63; its last epoch gave 86.1 / 94.0); a run of
this recipe reports its best and its last evaluation as every run does. Settings: the
bidirectional rewrite (pull 0.9, push 0.2, dynamic weights), 75 epochs with the lr x0.1 at
epochs 25 and 50, batch norm over the whole batch of 256, DBSCAN eps 0.6; the rest is
``market1501.py``. The authors start from torchvision's IMAGENET1K_V2 weights
(``resnet50-11ad3fa6.pth``); with the V1 file of the Cluster Contrast recipes the run is
comparable with 82.1, Cluster Contrast's figure. Differences from their code: docs/fidelity.md.
"""

from ccreid_jax.configs import market1501, variants


def get_config():
  return variants.bmw(market1501.get_config())
