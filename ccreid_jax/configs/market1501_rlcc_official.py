"""The official RLCC recipe on Market-1501: SpCL's label generator with RLCC's soft targets.

Reproduces: 77.7 mAP / 90.8 rank-1, SpCL + RLCC in the RLCC paper (Zhang et al., CVPR 2021; code
``2han9x1a0release/RLCC``, ``tools/config.yaml`` run by ``tools/main.py`` on OpenUnReID;
docs/algorithms.md sections 6, 8 and 10). Its base is not Cluster Contrast:

* pseudo labels: DBSCAN at eps 0.58 / 0.6 / 0.62 on the Jaccard distance with SpCL's
  cluster-reliability criterion (independence threshold fixed by the first epoch); DBSCAN
  outliers and unreliable members become singleton classes, which the memory and the loss
  include;
* memory: one row per class rebuilt from the class means every epoch, temperature 0.04,
  momentum 0.2, the sequential update;
* batch 64 = 16 pseudo identities x 4 images from the camera-aware sampler (a singleton class gives
  one image), 400 steps per epoch, 50 epochs; every batch norm over 16 images (the
  reference's per-GPU batch norm on 4 GPUs);
* RLCC: alpha 0.9, beta 0, prediction temperature 30; evaluation every 5 epochs.

Differences left (docs/fidelity.md): the reference's loss adds 1e-6 inside the softmax
normalisation and the log and skips the optimizer step when the loss is 0; it picks its best
checkpoint on a validation split of the training identities, this config on query / gallery.
Weights: torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, ``resnet50-19c8e357.pth``), given with
``--config.model.pretrained=weights/resnet50-19c8e357.pth``.
"""

from ccreid_jax.configs import market1501, variants


def get_config():
  config = variants.official_rlcc(market1501.get_config())
  config.train.iters = 400  # The recipe's steps per epoch (variants.official_rlcc leaves them).
  return config
