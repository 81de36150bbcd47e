"""Re-ID backbones: torchvision-layout ResNets with a GeM / BN / L2 neck."""

from ccreid_jax.models.layers import GeM, GhostBatchNorm
from ccreid_jax.models.resnet import ReIDResNet, create_model, feature_dim, l2_normalize

__all__ = ["GeM", "GhostBatchNorm", "ReIDResNet", "create_model", "feature_dim", "l2_normalize"]
