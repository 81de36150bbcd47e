"""Layers the re-ID ResNet needs beyond flax.linen: convolution, ghost batch norm, GeM pooling."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv(nn.Module):
  """A bias-free 2-D convolution: NHWC input, HWIO ``kernel``, as ``nn.Conv(use_bias=False)``.

  Same parameter (name, shape, init) and numbers as ``nn.Conv``, computed as matrix
  products where XLA:CPU's convolution is slow (the same sums in another order, equal up to
  float rounding; docs/benchmarks.md):
  * 1x1 kernels without padding: the input is strided, then multiplied by the
    (C_in, C_out) kernel matrix over the channel axis (3-9x faster on ResNet-50's shapes);
    the kernel gradient is one 2-D product over the pixel axis (``_pointwise``), which
    XLA:CPU computes without transposed copies of its operands;
  * other kernels on inputs of at most ``SMALL_MAP`` pixels (layer4 of small images): the
    k*k shifted windows are stacked on the channel axis (im2col) and multiplied by the
    (k*k*C_in, C_out) kernel matrix (up to 40x faster there; no faster at 8x4, slower on larger maps).
  On GPU these are GEMMs either way. Inputs and kernel are cast to ``dtype`` (bfloat16 for
  mixed precision).
  """

  SMALL_MAP = 16  # pixels (H * W) of the input up to which im2col is used (4x4, 8x2, ...).

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = tuple(tuple(p) for p in self.padding)
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      sh, sw = self.strides
      if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
      return _pointwise(x, kernel[0, 0])
    if x.shape[1] * x.shape[2] <= self.SMALL_MAP:
      return _im2col_conv(x, kernel, tuple(self.strides), padding)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=tuple(self.strides), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """(N, H, W, C_in) x (C_in, C_out) over the channel axis."""
  return jax.lax.dot_general(x, kernel, (((3,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution (NHWC input, (C_in, C_out) kernel) as a matmul over the channel axis.

  Its kernel gradient x^T dy contracts over the batch and spatial axes. Autodiff writes it
  as a dot_general over three axes, for which XLA:CPU materialises transposed copies of x
  and dy, recomputing in them whatever element-wise chain produced x (a batch norm, a
  residual stage, the stem's pool). As one product of the (N*H*W, C) views contracting
  their first axis it compiles to a single GEMM with no copy: the ResNet-50 train step
  on a 2-core CPU took 8-10% less time (docs/benchmarks.md). Same sums, other order.
  """
  return _matmul(x, kernel)


def _pointwise_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                                (((0,), (0,)), ((), ())))
  return dx, dkernel


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """``conv_general_dilated`` (NHWC, HWIO) as one matmul over stacked shifted windows."""
  kh, kw, c_in, c_out = kernel.shape
  sh, sw = strides
  padded = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  out_h = (padded.shape[1] - kh) // sh + 1
  out_w = (padded.shape[2] - kw) // sw + 1
  windows = [padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]  # (kh, kw, c_in) order = the kernel's.
  patches = jnp.concatenate(windows, axis=-1)
  return _pointwise(patches, kernel.reshape(kh * kw * c_in, c_out))


def _pool_windows(x: jax.Array) -> list[jax.Array]:
  """The 9 strided (Ho, Wo) slices of ``x`` padded by 1 with -inf, in row-major window order."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [padded[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :] for i in range(3) for j in range(3)]


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max pooling, stride 2, padding 1 (padded with -inf), NHWC: the ResNet stem's pool.

  The elementwise maximum of the 9 strided window slices: the same values as
  ``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))``. The gradient goes, as in torch, to
  the first maximum of each window in row-major order (a tie is not split), and is computed
  without ``select_and_scatter``, which XLA:CPU runs several times slower: the forward pass
  keeps the (Ho, Wo) index of each window's maximum (int8), and the backward pass builds the
  input gradient from its four stride-2 phases (even / odd rows x even / odd columns), each a
  sum of 1, 2 or 4 masked copies of the output gradient (docs/benchmarks.md).
  """
  return _max_pool_fwd(x)[0]  # under jit the unused index is dead code, removed by XLA.


def _max_pool_fwd(x):
  windows = _pool_windows(x)
  out, index = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
  for k, window in enumerate(windows[1:], start=1):
    index = jnp.where(window > out, jnp.int8(k), index)  # strict: an earlier maximum wins.
    out = jnp.maximum(out, window)
  return out, (index, x.shape[1:3])


def _pool_axis_grad(g0: jax.Array, g1: jax.Array, g2: jax.Array, n: int, axis: int) -> jax.Array:
  """Input gradient along ``axis`` (length ``n``) of a size-3, stride-2, padding-1 window.

  ``g<i>`` holds the output gradient sent to window offset i (output length ceil(n / 2)).
  Input index r is offset i of output o when r = 2 o + i - 1: an even r = 2m receives
  (o = m, i = 1); an odd r = 2m + 1 receives (o = m, i = 2) and (o = m + 1, i = 0).
  """
  # odd[m] is input row 2m + 1 (the last one lies past the input when n is odd; sliced off):
  # g2[m] plus g0[m + 1], which is zero past the output's end.
  shifted = jax.lax.slice_in_dim(g0, 1, g0.shape[axis], axis=axis)
  pad = [(0, 0)] * g0.ndim
  pad[axis] = (0, 1)
  odd = g2 + jnp.pad(shifted, pad)
  both = jnp.stack([g1, odd], axis=axis + 1)  # rows 0, 1, 2, 3, ... after the reshape
  shape = list(g1.shape)
  shape[axis] = 2 * g1.shape[axis]
  return jax.lax.slice_in_dim(both.reshape(shape), 0, n, axis=axis)


def _max_pool_bwd(residuals, dy):
  index, (h, w) = residuals
  g = [jnp.where(index == k, dy, jnp.zeros_like(dy)) for k in range(9)]
  by_row_offset = [_pool_axis_grad(g[3 * i], g[3 * i + 1], g[3 * i + 2], w, axis=2)
                   for i in range(3)]
  return (_pool_axis_grad(*by_row_offset, h, axis=1),)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def residual_relu(x: jax.Array) -> jax.Array:
  """``nn.relu`` for a residual block's output: same values and gradients, bit for bit.

  A block's output feeds the next block twice: its first convolution, which reads the
  buffer, and its residual sum. XLA:CPU fuses the cheap element-wise chain that produced it
  into that sum instead of reading the buffer, so block k of a stage re-derives the batch
  norms and sums of every earlier block of the stage, in the forward and the backward pass
  (fusions of up to 37 operands in ResNet-50). XLA does not duplicate a division into a
  fusion, so on the CPU the output is divided by a run-time 1.0 (y / 1 == y, and the
  gradient g / 1 == g, exactly): each block's output is computed once, and ResNet-50's
  train step reads 5% fewer bytes and took 7% less time on a 2-core CPU
  (docs/benchmarks.md). Other backends get ``nn.relu`` itself.
  """
  y = nn.relu(x)
  if jax.default_backend() != "cpu":
    return y
  # A 1.0 that XLA cannot constant-fold (it does not simplify v * 0 for floats), and 1
  # outright when v is not finite, so that one bad element cannot spread to the others.
  # With the batch sharded over several CPU devices this one element costs a scalar
  # all-reduce per block. A per-element 1.0 needs none but read 1.2-2.6% more bytes.
  v = jax.lax.stop_gradient(y.reshape(-1)[0])
  one = jnp.where(jnp.isfinite(v), v * 0 + 1, jnp.ones_like(v))
  return y / one


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
    scale = (self.param("scale", nn.initializers.ones, (features,), jnp.float32)
             if self.use_scale else None)
    bias = (self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
            if self.use_bias else None)

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = self._normalise(x32, mean, var, scale, bias)
    else:
      batch = x.shape[0]
      groups = batch // self.group_size if (
          batch > self.group_size and batch % self.group_size == 0) else 1
      # (G, B/G, ..., C): statistics over every axis but the group and channel axes.
      xg = x32.reshape((groups, batch // groups) + x.shape[1:])
      scale_or_1 = jnp.ones((features,), jnp.float32) if scale is None else scale
      bias_or_0 = jnp.zeros((features,), jnp.float32) if bias is None else bias
      if self.axis_name is None:
        y, mean, var = _batch_norm_train(xg, scale_or_1, bias_or_0, self.epsilon)
      else:  # autodiff, through the collectives.
        y, mean, var = _batch_norm_forward(xg, scale_or_1, bias_or_0, self.epsilon,
                                           self.axis_name)
      y = y.reshape(x.shape)

      if not self.is_initializing():
        count = xg.size // (groups * features)
        if self.axis_name is not None:
          count = count * jax.lax.psum(1, self.axis_name)
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1.0 - self.momentum) * jnp.mean(mean, axis=0))
        ra_var.value = (self.momentum * ra_var.value
                        + (1.0 - self.momentum) * jnp.mean(unbiased, axis=0))

    out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
    return y.astype(out_dtype)

  def _normalise(self, x, mean, var, scale, bias):
    mul = jax.lax.rsqrt(var + self.epsilon)
    if scale is not None:
      mul = mul * scale
    y = (x - mean) * mul
    if bias is not None:
      y = y + bias
    return y


def _group_axes(xg: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """For (G, ..., C) ``xg``: the axes reduced per group and channel, and the statistics'
  broadcast shape (G, 1, ..., 1, C)."""
  axes = tuple(range(1, xg.ndim - 1))
  return axes, (xg.shape[0],) + (1,) * len(axes) + (xg.shape[-1],)


def _batch_norm_forward(xg: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                        axis_name: str | None = None):
  """Training batch norm of (G, ..., C) ``xg`` per group and channel: (y, mean, biased var).

  Two passes (mean, then squared deviations) as torch does: no cancellation. With
  ``axis_name``, each pass's per-device means are averaged across that mapped axis."""
  axes, stat_shape = _group_axes(xg)

  def group_mean(v):  # per group and channel (and across axis_name)
    m = jnp.mean(v, axis=axes)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)

  mean = group_mean(xg)
  centred = xg - mean.reshape(stat_shape)
  var = group_mean(jnp.square(centred))
  mul = jax.lax.rsqrt(var.reshape(stat_shape) + epsilon) * scale
  return centred * mul + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(xg: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
  """``_batch_norm_forward`` with the textbook gradient instead of autodiff's.

  Autodiff of the two-pass statistics differentiates through the centred copy and both
  means; the closed form needs two sums per group and channel, of dy and of
  dy * (x - mean), and one element-wise pass: the ResNet-50 train step on a 2-core CPU took
  5% less time (docs/benchmarks.md). The gradient is written as torch's CPU kernel writes
  it, dx = (dy - mean(dy) - (x - mean) * k) * rstd * scale with k = sum(dy * (x - mean))
  * rstd^2 / n: every term reads x or dy, so XLA:CPU fuses the centring into the reduction
  and the output pass, and no normalised copy x_hat is written (ResNet-50's batch norms +
  ReLU, forward and backward, ran 4-13% faster; its train step reads 7% fewer bytes).
  Same values forward; gradients equal up to float rounding.
  """
  return _batch_norm_forward(xg, scale, bias, epsilon)


def _batch_norm_fwd(xg, scale, bias, epsilon):
  out = _batch_norm_forward(xg, scale, bias, epsilon)
  return out, (xg, out[1], out[2], scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  xg, mean, var, scale = residuals
  dy, dmean, dvar = cotangents
  axes, stat_shape = _group_axes(xg)
  count = math.prod(xg.shape[a] for a in axes)
  rstd = jax.lax.rsqrt(var + epsilon)                               # (G, C)
  centred = xg - mean.reshape(stat_shape)
  sum_dy = jnp.sum(dy, axis=axes)
  dot = jnp.sum(dy * centred, axis=axes)                            # sum(dy * x_hat) / rstd
  k = dot * jnp.square(rstd) / count
  dx = ((dy - (sum_dy / count).reshape(stat_shape) - centred * k.reshape(stat_shape))
        * (rstd * scale).reshape(stat_shape))
  # The statistics are outputs too (the running averages use them).
  dx = dx + (dmean / count).reshape(stat_shape) + centred * (2.0 * dvar / count).reshape(
      stat_shape)
  return dx, jnp.sum(dot * rstd, axis=0), jnp.sum(sum_dy, axis=0)


_batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


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
