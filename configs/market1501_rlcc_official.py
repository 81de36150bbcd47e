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
* batch 64 = 16 pseudo-ids x 4 images from the camera-aware sampler (a singleton class gives
  one image), 400 steps per epoch, 50 epochs; every batch norm over 16 images (the
  reference's per-GPU batch norm on 4 GPUs);
* RLCC: alpha 0.9, beta 0, prediction temperature 30; evaluation every 5 epochs.

Differences left (docs/fidelity.md): the reference's loss adds 1e-6 inside the softmax
normalisation and the log and skips the optimizer step when the loss is 0; it picks its best
checkpoint on a validation split of the training identities, this config on query / gallery.
Weights: torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, ``resnet50-19c8e357.pth``), given with
``--config.model.pretrained=weights/resnet50-19c8e357.pth``.
"""

from ccreid_jax.configs import market1501


def official_rlcc(config):
  """The official RLCC recipe's fields on top of a dataset config."""
  config.cluster.reliable = True
  config.cluster.eps_tight = 0.58
  config.cluster.eps = 0.6
  config.cluster.eps_loose = 0.62
  config.rlcc.enabled = True
  config.rlcc.outliers_as_singletons = True
  config.rlcc.alpha = 0.9
  config.rlcc.beta = 0.0
  config.rlcc.pred_temp = 30.0
  config.memory.temperature = 0.04
  config.memory.momentum = 0.2
  config.train.batch_size = 64
  config.train.num_instances = 4
  config.train.iters = 400
  config.train.eval_every = 5
  config.model.bn_group_size = 16
  return config


def get_config():
  return official_rlcc(market1501.get_config())
