"""The CPU kernel set: ResNet layers rewritten for XLA:CPU, opt-in through ``model.kernels``.

``ReIDResNet(kernels="cpu")`` builds its trunk from these instead of the plain layers
(``nn.Conv``, ``nn.max_pool``, ``nn.relu``, ``layers.GhostBatchNorm``); ``model.kernels =
"auto"`` (the default) picks them when JAX's default backend is the CPU
(``resnet.resolve_kernels``). Each one computes what its plain counterpart computes, with the
same parameters (names, shapes, initialisation), so checkpoints and pretrained weights are
shared by both sets; values and gradients agree up to float rounding
(``tests/test_cpu_kernels.py``). Each is written so that XLA:CPU compiles it to less work
than the plain layer: the measurements are in docs/benchmarks.md, and
``scripts/bench_train.py --kernels both`` times the two sets side by side.

* ``Conv``: a bias-free convolution computed as matrix products where XLA:CPU's convolution
  is slow. A 1x1 kernel (after striding the input, for the downsample) is one matmul over
  the channel axis; a k x k kernel on an input of at most ``Conv.SMALL_MAP`` pixels (layer4
  of small images) stacks the k*k shifted windows on the channel axis (im2col) and is one
  matmul. Every other convolution is ``lax.conv_general_dilated``, as in ``nn.Conv``.
* ``_pointwise``, the matmul of both paths, has a custom gradient: the kernel gradient is one
  2-D product of the (pixels, channels) views contracting the pixel axis. Autodiff writes it
  as a three-axis contraction, for which XLA:CPU materialises transposed copies of both
  operands and recomputes in them the element-wise chain that produced the input.
* ``max_pool_3x3_s2``: the stem's 3x3 / stride-2 / padding-1 max pool as the maximum of 9
  strided slices, with a gradient built from the four stride-2 phases of the input instead of
  ``select_and_scatter``, which XLA:CPU runs several times slower. As in torch (and
  ``nn.max_pool``), the gradient of a window goes to its first maximum.
* ``residual_relu``: a residual block's output ReLU, divided by a run-time 1.0. XLA:CPU
  otherwise fuses the cheap element-wise chain that produced a block's output into the next
  blocks' sums and recomputes it there (the earlier blocks of a stage again and again); it
  does not duplicate a division into a fusion, so each output is computed once. Values and
  gradients are ``nn.relu``'s bit for bit.
* ``GhostBatchNorm``: ``layers.GhostBatchNorm`` with the closed-form training gradient
  (``batch_norm_train``): two sums per group and channel and one element-wise pass, in
  which every term reads x or dy, instead of autodiff through the two-pass statistics, which
  also writes a centred copy for the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccreid_jax.models import layers


class Conv(nn.Module):
  """A bias-free 2-D convolution: NHWC input, HWIO ``kernel``, as ``nn.Conv(use_bias=False)``.

  Same parameter (name, shape, init) and the same sums as ``nn.Conv``, in another order on
  the matmul paths (see the module doc): 1x1 kernels without padding, and any kernel on an
  input of at most ``SMALL_MAP`` pixels. Inputs and kernel are cast to ``dtype`` (bfloat16
  for mixed precision).
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
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    sh, sw = self.strides
    (top, bottom), (left, right) = self.padding
    padding = ((top, bottom), (left, right))
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
      return _pointwise(x, kernel[0, 0])
    if x.shape[1] * x.shape[2] <= self.SMALL_MAP:
      return _im2col_conv(x, kernel, (sh, sw), padding)
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(sh, sw),
      padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """(N, H, W, C_in) x (C_in, C_out) over the channel axis."""
  return jax.lax.dot_general(x, kernel, (((3,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution (NHWC input, (C_in, C_out) kernel) as a matmul over the channel axis.

  Its kernel gradient x^T dy is one product of the (N*H*W, C) views contracting their first
  axis (see the module doc); the input gradient is dy times the transposed kernel.
  """
  return _matmul(x, kernel)


def _pointwise_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(
    x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ()))
  )
  return dx, dkernel


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _im2col_conv(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """``conv_general_dilated`` (NHWC, HWIO) as one matmul over stacked shifted windows."""
  kh, kw, c_in, c_out = kernel.shape
  sh, sw = strides
  padded = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  out_h = (padded.shape[1] - kh) // sh + 1
  out_w = (padded.shape[2] - kw) // sw + 1
  windows = [
    padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]  # (kh, kw, c_in) order = the kernel's.
  patches = jnp.concatenate(windows, axis=-1)
  return _pointwise(patches, kernel.reshape(kh * kw * c_in, c_out))


def _pool_windows(x: jax.Array) -> list[jax.Array]:
  """The 9 strided (Ho, Wo) slices of ``x`` padded by 1 with -inf, in row-major window order."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [
    padded[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2, :] for i in range(3) for j in range(3)
  ]


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max pooling, stride 2, padding 1 (padded with -inf), NHWC: the ResNet stem's pool.

  The elementwise maximum of the 9 strided window slices: the values of
  ``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))``. The gradient goes, as in torch, to
  the first maximum of each window in row-major order (a tie is not split): the forward pass
  keeps the (Ho, Wo) index of each window's maximum (int8), and the backward pass builds the
  input gradient from its four stride-2 phases (even / odd rows x even / odd columns), each a
  sum of 1, 2 or 4 masked copies of the output gradient.
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
  row0, row1, row2 = (
    _pool_axis_grad(g[3 * i], g[3 * i + 1], g[3 * i + 2], w, axis=2) for i in range(3)
  )  # by row offset
  return (_pool_axis_grad(row0, row1, row2, h, axis=1),)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def residual_relu(x: jax.Array) -> jax.Array:
  """``nn.relu`` for a residual block's output: same values and gradients, bit for bit.

  The output is divided by a run-time 1.0 (y / 1 == y, and the gradient g / 1 == g,
  exactly), so that XLA computes each block's output once instead of recomputing it inside
  later blocks' fusions (see the module doc).
  """
  y = nn.relu(x)
  # A 1.0 that XLA cannot constant-fold (it does not simplify v * 0 for floats), and 1
  # outright when v is not finite, so that one bad element cannot spread to the others.
  # With the batch sharded over several devices this one element costs a scalar
  # all-reduce per block (a per-element 1.0 needs none but moves more bytes).
  v = jax.lax.stop_gradient(y.reshape(-1)[0])
  one = jnp.where(jnp.isfinite(v), v * 0 + 1, jnp.ones_like(v))
  return y / one


class GhostBatchNorm(layers.GhostBatchNorm):
  """``layers.GhostBatchNorm`` (same variables and values) with the closed-form gradient.

  Training statistics over a single device use ``batch_norm_train``; with ``axis_name``
  (statistics pooled across devices) the gradient is autodiff's, through the collectives,
  as in the plain layer.
  """

  def _normalise_groups(self, xg, scale, bias):
    if self.axis_name is not None:
      return super()._normalise_groups(xg, scale, bias)
    return batch_norm_train(xg, scale, bias, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(xg: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
  """``layers.batch_norm_groups`` with the textbook gradient instead of autodiff's.

  The closed form needs two sums per group and channel, of dy and of dy * (x - mean), and one
  element-wise pass, written as torch's CPU kernel writes it: dx = (dy - mean(dy) - (x - mean)
  * k) * rstd * scale with k = sum(dy * (x - mean)) * rstd^2 / n. Every term reads x or dy,
  so XLA:CPU fuses the centring into the reductions and the output pass and writes no
  normalised copy. The returned mean and variance (which feed the running statistics) are
  differentiated too. Same values forward; gradients equal up to float rounding.
  """
  return layers.batch_norm_groups(xg, scale, bias, epsilon)


def _batch_norm_fwd(xg, scale, bias, epsilon):
  out = layers.batch_norm_groups(xg, scale, bias, epsilon)
  return out, (xg, out[1], out[2], scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  xg, mean, var, scale = residuals
  dy, dmean, dvar = cotangents
  axes, stat_shape = layers.group_axes(xg)
  count = math.prod(xg.shape[a] for a in axes)
  rstd = jax.lax.rsqrt(var + epsilon)  # (G, C)
  centred = xg - mean.reshape(stat_shape)
  sum_dy = jnp.sum(dy, axis=axes)
  dot = jnp.sum(dy * centred, axis=axes)  # sum(dy * x_hat) / rstd
  k = dot * jnp.square(rstd) / count
  dx = (dy - (sum_dy / count).reshape(stat_shape) - centred * k.reshape(stat_shape)) * (
    rstd * scale
  ).reshape(stat_shape)
  # The statistics are outputs too (the running averages use them).
  dx = dx + (dmean / count).reshape(stat_shape) + centred * (2.0 * dvar / count).reshape(stat_shape)
  return dx, jnp.sum(dot * rstd, axis=0), jnp.sum(sum_dy, axis=0)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
