"""Layers the re-ID ResNet needs beyond flax.linen: ghost batch norm and GeM pooling.

The CPU kernel set (``model.kernels``) has its own variants of the ResNet's layers in
``cpu_kernels.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class GhostBatchNorm(nn.Module):
  """Batch norm whose training statistics come from fixed-size chunks of the batch.

  The reference trains with PyTorch DataParallel on 4 GPUs, so every BatchNorm sees
  64-image chunks of the 256-image batch. With ``group_size`` = 64 this module does the
  same on any number of devices: when the batch B is larger than ``group_size`` and a
  multiple of it, the batch axis is cut into ``B // group_size`` contiguous groups and each
  group is normalised with its own mean and biased variance. Otherwise the whole batch is
  one group.

  Running statistics (collection ``batch_stats``: ``mean`` init 0, ``var`` init 1) follow
  torch: ``ra = momentum * ra + (1 - momentum) * stat`` with the UNBIASED variance. With
  several groups, ``stat`` is the mean over groups of each group's mean / unbiased
  variance. DataParallel keeps only replica 0's update; averaging the groups instead makes
  the running statistics independent of device order (and less noisy).

  Statistics are computed in float32 whatever ``dtype`` is; ``dtype`` only sets the
  output type (None: the input's type promoted with float32 parameters).

  ``axis_name``: when set (inside shard_map / pmap), the statistics of each group index
  are averaged across that axis, i.e. group g of every device forms one larger group.

  Gradients are autodiff's (through the collectives with ``axis_name``);
  ``cpu_kernels.GhostBatchNorm`` is the same layer with a closed-form training gradient.
  """

  group_size: int = 64
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  dtype: Any = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = (
      self.param("scale", nn.initializers.ones, (features,), jnp.float32)
      if self.use_scale
      else None
    )
    bias = (
      self.param("bias", nn.initializers.zeros, (features,), jnp.float32) if self.use_bias else None
    )

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = self._normalise(x32, mean, var, scale, bias)
    else:
      batch = x.shape[0]
      groups = (
        batch // self.group_size
        if (batch > self.group_size and batch % self.group_size == 0)
        else 1
      )
      # (G, B/G, ..., C): statistics over every axis but the group and channel axes.
      xg = x32.reshape((groups, batch // groups) + x.shape[1:])
      scale_or_1 = jnp.ones((features,), jnp.float32) if scale is None else scale
      bias_or_0 = jnp.zeros((features,), jnp.float32) if bias is None else bias
      y, mean, var = self._normalise_groups(xg, scale_or_1, bias_or_0)
      y = y.reshape(x.shape)

      if not self.is_initializing():
        count = xg.size // (groups * features)
        if self.axis_name is not None:
          count = count * jax.lax.psum(1, self.axis_name)
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * jnp.mean(
          mean, axis=0
        )
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * jnp.mean(
          unbiased, axis=0
        )

    out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
    return y.astype(out_dtype)

  def _normalise_groups(self, xg, scale, bias):
    """Training normalisation of the (G, ..., C) groups: (y, mean, biased variance)."""
    return batch_norm_groups(xg, scale, bias, self.epsilon, self.axis_name)

  def _normalise(self, x, mean, var, scale, bias):
    mul = jax.lax.rsqrt(var + self.epsilon)
    if scale is not None:
      mul = mul * scale
    y = (x - mean) * mul
    if bias is not None:
      y = y + bias
    return y


def group_axes(xg: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """For (G, ..., C) ``xg``: the axes reduced per group and channel, and the statistics'
  broadcast shape (G, 1, ..., 1, C)."""
  axes = tuple(range(1, xg.ndim - 1))
  return axes, (xg.shape[0],) + (1,) * len(axes) + (xg.shape[-1],)


def batch_norm_groups(
  xg: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None = None
):
  """Training batch norm of (G, ..., C) ``xg`` per group and channel: (y, mean, biased var).

  Two passes (mean, then squared deviations) as torch does: no cancellation. With
  ``axis_name``, each pass's per-device means are averaged across that mapped axis."""
  axes, stat_shape = group_axes(xg)

  def group_mean(v):  # per group and channel (and across axis_name)
    m = jnp.mean(v, axis=axes)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)

  mean = group_mean(xg)
  centred = xg - mean.reshape(stat_shape)
  var = group_mean(jnp.square(centred))
  mul = jax.lax.rsqrt(var.reshape(stat_shape) + epsilon) * scale
  return centred * mul + bias, mean, var


class GeM(nn.Module):
  """Generalised-mean pooling over H and W: ``mean_hw(clip(x, eps) ** p) ** (1 / p)``.

  ``p`` (shape (1,), init ``p_init``) is a trained parameter when ``learnable``; otherwise
  the fixed ``p_init`` is used and no parameter is created. Computes in float32 and returns
  (B, C) float32 for an input (B, H, W, C).
  """

  p_init: float = 3.0
  eps: float = 1e-6
  learnable: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.learnable:
      p = self.param("p", nn.initializers.constant(self.p_init), (1,), jnp.float32)
    else:
      p = jnp.full((1,), self.p_init, jnp.float32)
    x = jnp.maximum(x.astype(jnp.float32), self.eps)
    pooled = jnp.mean(jnp.power(x, p), axis=(1, 2))
    return jnp.power(pooled, 1.0 / p)
