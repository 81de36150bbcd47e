"""Re-ID backbones: torchvision-layout ResNets (and ResNet-IBN-a) with a GeM / BN / L2 neck,
and loaders for pretrained backbone weights.

``ReIDResNet(kernels=...)`` builds on flax's plain layers ("plain") or on the XLA:CPU
variants of ``cpu_kernels`` ("cpu"); ``create_model`` resolves ``model.kernels = "auto"``.
"""

from ccreid_jax.models.layers import GeM, GhostBatchNorm
from ccreid_jax.models.resnet import (
  IBN,
  InstanceNorm,
  ReIDResNet,
  create_model,
  feature_dim,
  l2_normalize,
  parse_arch,
  resolve_kernels,
)
from ccreid_jax.models.weights import (
  UnsafeCheckpointError,
  WeightsFormatError,
  WeightsMismatchError,
  load_pretrained,
  read_state_dict,
  torchvision_to_flax,
)

__all__ = [
  "IBN",
  "GeM",
  "GhostBatchNorm",
  "InstanceNorm",
  "ReIDResNet",
  "UnsafeCheckpointError",
  "WeightsFormatError",
  "WeightsMismatchError",
  "create_model",
  "feature_dim",
  "l2_normalize",
  "load_pretrained",
  "parse_arch",
  "read_state_dict",
  "resolve_kernels",
  "torchvision_to_flax",
]
