"""Cluster Contrast on MSMT17, the published recipe (DBSCAN on the Jaccard distance).

Reproduces: 27.6 mAP / 56.0 rank-1, the ResNet-50 DBSCAN figure of the Cluster Contrast README
(``alibaba/cluster-contrast-reid``; docs/algorithms.md section 8). Batch 256 = 16 pseudo-ids x
16 images, 400 steps per epoch, 50 epochs, eps 0.6.

Weights: the run starts from torchvision's ImageNet ResNet-50 (IMAGENET1K_V1,
``resnet50-19c8e357.pth``), given with ``--config.model.pretrained=weights/resnet50-19c8e357.pth``;
IMAGENET1K_V2 weights are another recipe, not comparable with the published figure.
Precision: ``model.precision = "default"`` lets GPUs run convolutions with TF32 passes, as
PyTorch's cuDNN default (``allow_tf32``) did for the reference on Ampere GPUs; set "float32" for
true float32 products.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "msmt17"
  config.train.iters = 400
  return config
