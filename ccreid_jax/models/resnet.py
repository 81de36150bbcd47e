"""ResNet backbone with the Cluster Contrast neck (GeM or average pooling, BN, L2 norm).

The layout is torchvision's (v1.5: the bottleneck strides on its 3x3 conv) and the module
names mirror torchvision's state-dict keys (``layer4.0.downsample.0`` -> ``layer4_0/
downsample_conv``) so that ImageNet weights can be mapped over one to one.

With ``ibn=True`` it is IBN-Net's ResNet-IBN-a: the first norm of every block in layer1-3 is
an ``IBN`` layer (instance norm on the first half of the channels, batch norm on the rest,
names ``bn1/IN`` and ``bn1/BN`` as IBN-Net's ``bn1.IN`` / ``bn1.BN``); stem and layer4 are
unchanged.

The layers come from one of two sets, chosen by ``ReIDResNet.kernels`` (``LAYER_SETS``):
"plain", flax's own layers (``nn.Conv``, ``nn.max_pool``, ``nn.relu``) and
``layers.GhostBatchNorm``, the default; or "cpu", their XLA:CPU-friendly variants in
``cpu_kernels.py``. Both have the same parameters, so a checkpoint or pretrained file fits
either; ``create_model`` resolves the config's ``model.kernels = "auto"`` to "cpu" when JAX
runs on the CPU and to "plain" elsewhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccreid_jax.models import cpu_kernels
from ccreid_jax.models.layers import GeM, GhostBatchNorm
from ccreid_jax.ops import l2_normalize  # re-exported: models.l2_normalize, resnet.l2_normalize

# Supported ResNet depths: depth -> (block kind, blocks per stage).
ARCHS = {
  10: ("basic", (1, 1, 1, 1)),
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}
BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4}  # block kind -> output / inner channels


def conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` for an HWIO kernel.

  A plain (untruncated) normal with variance 2 / (kh * kw * out_channels): the same values,
  bit for bit, as ``nn.initializers.variance_scaling(2.0, "fan_out", "normal")`` (JAX draws
  an array's normals in flat order whatever its shape; tested). The normals are drawn as a
  flat vector because XLA:CPU compiles the sampler for a small 4-D shape several times
  slower, and the model's initialisation compiles it once per kernel shape. The barrier keeps XLA
  from folding the scale into the sampler's own constants when the initialisation is jitted (which
  rounds 1 ulp differently); eager and jitted initialisation then draw the same values.
  """
  kh, kw, _, c_out = shape
  variance = jnp.array(2.0 / (kh * kw * c_out), dtype=dtype)
  normal = jax.lax.optimization_barrier(jax.random.normal(key, (math.prod(shape),), dtype))
  return (normal * jnp.sqrt(variance)).reshape(shape)


def block_layout(depth: int) -> tuple[str, tuple[int, ...]]:
  """(block kind, blocks per stage) of a ResNet depth; ValueError for an unsupported depth."""
  if depth not in ARCHS:
    raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(ARCHS)}")
  return ARCHS[depth]


def feature_dim(depth: int, width: int = 64) -> int:
  """Channels of the final feature: 8 * width (basic blocks) or 32 * width (bottlenecks)."""
  kind, _ = block_layout(depth)
  return 8 * width * BLOCK_EXPANSION[kind]


class LayerSet(NamedTuple):
  """The layers a ReIDResNet is built from."""

  conv: Callable[..., nn.Module]  # bias-free convolution with nn.Conv's fields and parameter.
  batch_norm: type[GhostBatchNorm]
  stem_pool: Callable[[jax.Array], jax.Array]  # 3x3 max pool, stride 2, padding 1 (-inf).
  block_relu: Callable[[jax.Array], jax.Array]  # the ReLU after a residual block's sum.


def _stem_pool(x: jax.Array) -> jax.Array:
  """3x3 max pooling, stride 2, over the input padded by 1 with -inf (torch's MaxPool2d).

  Padded explicitly and pooled with "VALID", which converters such as jax2onnx map to one
  ONNX MaxPool.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


POOLINGS = ("gem", "avg")  # GeM (learnable p, init 3) or average pooling.

LAYER_SETS = {
  "plain": LayerSet(
    conv=functools.partial(nn.Conv, use_bias=False),
    batch_norm=GhostBatchNorm,
    stem_pool=_stem_pool,
    block_relu=nn.relu,
  ),
  "cpu": LayerSet(
    conv=cpu_kernels.Conv,
    batch_norm=cpu_kernels.GhostBatchNorm,
    stem_pool=cpu_kernels.max_pool_3x3_s2,
    block_relu=cpu_kernels.residual_relu,
  ),
}
KERNELS = ("auto",) + tuple(LAYER_SETS)


def resolve_kernels(kernels: str, backend: str | None = None) -> str:
  """``model.kernels`` as a ``LAYER_SETS`` key: "auto" is "cpu" when ``backend`` (default:
  JAX's default backend) is the CPU and "plain" otherwise."""
  if kernels == "auto":
    backend = jax.default_backend() if backend is None else backend
    return "cpu" if backend == "cpu" else "plain"
  if kernels not in LAYER_SETS:
    raise ValueError(f"unknown model.kernels {kernels!r}; use one of {list(KERNELS)}")
  return kernels


class InstanceNorm(nn.Module):
  """torch InstanceNorm2d(affine=True, track_running_stats=False) on NHWC input.

  Each sample's channels are normalised with their own mean and biased variance over H and
  W (the same in train and eval mode; no running statistics), then scaled and shifted.
  Statistics are computed in float32; ``dtype`` sets the output type (None: the input's
  type promoted with float32).
  """

  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    centred = x32 - jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
    return y.astype(out_dtype)


class IBN(nn.Module):
  """IBN-Net's IBN layer: ``InstanceNorm`` (``IN``) on the first ``int(C * 0.5)`` channels,
  ``norm`` (a batch norm, ``BN``) on the rest, concatenated back in channel order."""

  norm: Any
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    half = int(x.shape[-1] * 0.5)
    a = InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="IN")(x[..., :half])
    b = self.norm(name="BN")(x[..., half:], use_running_average=use_running_average)
    return jnp.concatenate([a, b.astype(a.dtype)], axis=-1)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((k // 2, k // 2), (k // 2, k // 2))


def _block_norm(block: nn.Module, name: str, *, train: bool):
  """The block's norm called ``name`` (bn1 may be IBN), bound to train/eval mode."""
  norm = block.norm1 if name == "bn1" and block.norm1 is not None else block.norm
  return functools.partial(norm(name=name), use_running_average=not train)


def _shortcut(block: nn.Module, x, channels: int, bn):
  """Identity, or 1x1 conv (with the block's stride) + norm when the shape changes."""
  if not block.downsample:
    return x
  x = block.conv(
    channels, (1, 1), strides=(block.stride, block.stride), padding=_pad(1), name="downsample_conv"
  )(x)
  return bn("downsample_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs; expansion 1."""

  planes: int
  stride: int
  downsample: bool
  conv: Any
  norm: Any
  norm1: Any = None  # the norm after conv1 when it differs from ``norm`` (IBN)
  out_relu: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(_block_norm, self, train=train)
    stride = (self.stride, self.stride)
    y = self.conv(self.planes, (3, 3), strides=stride, padding=_pad(3), name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = self.conv(self.planes, (3, 3), strides=(1, 1), padding=_pad(3), name="conv2")(y)
    y = bn("bn2")(y)
    return self.out_relu(y + _shortcut(self, x, self.planes, bn))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, torchvision v1.5) -> 1x1 with 4x expansion."""

  planes: int
  stride: int
  downsample: bool
  conv: Any
  norm: Any
  norm1: Any = None  # the norm after conv1 when it differs from ``norm`` (IBN)
  out_relu: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(_block_norm, self, train=train)
    stride = (self.stride, self.stride)
    y = self.conv(self.planes, (1, 1), strides=(1, 1), padding=_pad(1), name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = self.conv(self.planes, (3, 3), strides=stride, padding=_pad(3), name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = self.conv(self.planes * 4, (1, 1), strides=(1, 1), padding=_pad(1), name="conv3")(y)
    y = bn("bn3")(y)
    return self.out_relu(y + _shortcut(self, x, self.planes * 4, bn))


class ReIDResNet(nn.Module):
  """torchvision ResNet trunk + pooling + BN neck (bias fixed at 0) + L2 normalisation.

  Input: float32 NHWC images, already normalised. Output: (B, feature_dim) float32 unit
  rows, in train and eval mode alike. Convolutions compute in ``dtype``; every batch norm
  computes its statistics in float32 (the trunk's norms return ``dtype`` activations); the
  pooling, the neck and the returned feature are float32.

  ``kernels`` picks the layer set (``LAYER_SETS``): "plain" (flax's layers) or "cpu"
  (``cpu_kernels``); the parameters are the same either way.
  """

  depth: int = 50
  width: int = 64
  last_stride: int = 1
  pooling: str = "gem"
  bn_group_size: int = 64
  dtype: Any = jnp.float32
  ibn: bool = False  # IBN-Net ResNet-IBN-a: IBN as bn1 of every block in layer1-3.
  kernels: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, return_feature_map: bool = False) -> jax.Array:
    if self.kernels not in LAYER_SETS:
      raise ValueError(
        f"ReIDResNet.kernels must be one of {sorted(LAYER_SETS)}, not "
        f"{self.kernels!r} (resolve_kernels turns 'auto' into one of them)"
      )
    layer_set = LAYER_SETS[self.kernels]
    kind, layers = block_layout(self.depth)
    expansion = BLOCK_EXPANSION[kind]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    conv = functools.partial(
      layer_set.conv, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init
    )
    norm = functools.partial(
      layer_set.batch_norm,
      group_size=self.bn_group_size,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
    )
    ibn_norm = functools.partial(IBN, norm=norm, dtype=self.dtype)

    x = conv(self.width, (7, 7), strides=(2, 2), padding=_pad(7), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x, use_running_average=not train))
    x = layer_set.stem_pool(x)

    in_planes = self.width
    strides = (1, 2, 2, self.last_stride)
    for stage, (blocks, stage_stride) in enumerate(zip(layers, strides)):
      planes = self.width * 2**stage
      for index in range(blocks):
        stride = stage_stride if index == 0 else 1
        downsample = index == 0 and (stride != 1 or in_planes != planes * expansion)
        x = block_cls(
          planes=planes,
          stride=stride,
          downsample=downsample,
          conv=conv,
          norm=norm,
          norm1=ibn_norm if self.ibn and stage < 3 else None,
          out_relu=layer_set.block_relu,
          name=f"layer{stage + 1}_{index}",
        )(x, train)
        in_planes = planes * expansion
    if return_feature_map:
      return x

    if self.pooling == "gem":
      x = GeM(name="gem")(x)
    elif self.pooling == "avg":
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    else:
      raise ValueError(f"unknown pooling {self.pooling!r}; use one of {list(POOLINGS)}")

    x = layer_set.batch_norm(
      group_size=self.bn_group_size,
      momentum=0.9,
      epsilon=1e-5,
      use_bias=False,
      dtype=jnp.float32,
      name="feat_bn",
    )(x, use_running_average=not train)
    return l2_normalize(x)


# model.dtype names -> the compute dtype of the network.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_arch(arch: str, depth: int | None = None) -> tuple[int, bool]:
  """(depth, ibn) for ``model.arch``.

  "resnet" / "resnet_ibn_a" take the depth from ``depth``; "resnet50", "resnet101_ibn_a"
  and the like name it, and then ``depth`` (if given) must agree.
  """
  name = arch.lower()
  ibn = name.endswith("_ibn_a")
  stem = name[: -len("_ibn_a")] if ibn else name
  digits = stem[len("resnet") :]
  if not stem.startswith("resnet") or (digits and not digits.isdigit()):
    raise ValueError(
      f"unknown model arch {arch!r}; use 'resnet', 'resnet_ibn_a', "
      "'resnet<depth>' or 'resnet<depth>_ibn_a' (e.g. 'resnet50_ibn_a')"
    )
  if digits:
    named = int(digits)
    if depth is not None and int(depth) != named:
      raise ValueError(
        f"model.arch {arch!r} is a depth-{named} network but model.depth is "
        f"{depth}; set model.depth={named}"
      )
    depth = named
  if depth is None:
    raise ValueError(f"model.arch {arch!r} needs model.depth")
  block_layout(int(depth))
  return int(depth), ibn


def create_model(config_model) -> ReIDResNet:
  """Builds a ReIDResNet from a config with depth, width, last_stride, pooling,
  bn_group_size, dtype ("float32" | "bfloat16") and optionally arch ("resnet" default,
  "resnet50_ibn_a", "resnet101_ibn_a", ...; see ``parse_arch``) and kernels ("auto"
  default, "plain" or "cpu"; see ``resolve_kernels``)."""
  depth, ibn = parse_arch(
    str(getattr(config_model, "arch", None) or "resnet"), int(config_model.depth)
  )
  dtype = config_model.dtype
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown model dtype {dtype!r}; use one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype]
  return ReIDResNet(
    depth=depth,
    width=int(config_model.width),
    last_stride=int(config_model.last_stride),
    pooling=str(config_model.pooling),
    bn_group_size=int(config_model.bn_group_size),
    dtype=dtype,
    ibn=ibn,
    kernels=resolve_kernels(str(getattr(config_model, "kernels", None) or "auto")),
  )
