"""The PyTorch Cluster Contrast model, written from docs/algorithms.md section 2.

torchvision's ResNet layout with last stride 1, GeM pooling (learnable p), a BatchNorm1d neck
whose bias is 0 and frozen, and ``F.normalize``. Module names follow torchvision's state-dict
keys, so ``models.weights.torchvision_to_flax`` maps them. The parity tests compare the Flax
model with it; ``scripts/bench_train.py --torch`` times it against the JAX step.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TorchGeM(nn.Module):
  def __init__(self, p=3.0, eps=1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.ones(1) * p)
    self.eps = eps

  def forward(self, x):
    x = x.clamp(min=self.eps).pow(self.p)
    return F.avg_pool2d(x, (x.size(-2), x.size(-1))).pow(1.0 / self.p).flatten(1)


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(out + shortcut)


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(out + shortcut)


_LAYOUT = {
  10: (TorchBasicBlock, (1, 1, 1, 1)),
  18: (TorchBasicBlock, (2, 2, 2, 2)),
  34: (TorchBasicBlock, (3, 4, 6, 3)),
  50: (TorchBottleneck, (3, 4, 6, 3)),
  101: (TorchBottleneck, (3, 4, 23, 3)),
}


class TorchReIDResNet(nn.Module):
  """torchvision trunk (last stride 1) + GeM + BatchNorm1d neck (bias 0, frozen) + normalize."""

  def __init__(self, depth, width=64):
    super().__init__()
    block, layers = _LAYOUT[depth]
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_planes = width
    for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 1))):
      planes = width * 2**stage
      modules = []
      for index in range(blocks):
        s = stride if index == 0 else 1
        downsample = None
        if index == 0 and (s != 1 or in_planes != planes * block.expansion):
          downsample = nn.Sequential(
            nn.Conv2d(in_planes, planes * block.expansion, 1, s, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
          )
        modules.append(block(in_planes, planes, s, downsample))
        in_planes = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*modules))
    self.gem = TorchGeM()
    self.feat_bn = nn.BatchNorm1d(in_planes)
    nn.init.constant_(self.feat_bn.weight, 1)
    nn.init.constant_(self.feat_bn.bias, 0)
    self.feat_bn.bias.requires_grad_(False)
    self.dim = in_planes

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return F.normalize(self.feat_bn(self.gem(x)))
