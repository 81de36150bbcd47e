"""The CPU kernel set (models/cpu_kernels.py) against the plain layers it replaces: the same
parameters, the same values and gradients (up to float rounding; bit for bit where stated),
and model.kernels' resolution."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccreid_jax.models import ReIDResNet, cpu_kernels, create_model, layers, resolve_kernels
from ccreid_jax.models.resnet import conv_init

KEY = jax.random.key(0)


# --------------------------------------------------------------------------------- Conv


@pytest.mark.parametrize(
  "kernel,strides,padding,dtype,hw,c_in",
  [
    ((1, 1), (1, 1), ((0, 0), (0, 0)), jnp.float32, (11, 7), 16),  # the matrix-product path
    ((1, 1), (2, 2), ((0, 0), (0, 0)), jnp.float32, (11, 7), 16),  # strided 1x1, odd size
    ((1, 1), (2, 2), ((0, 0), (0, 0)), jnp.bfloat16, (11, 7), 16),
    ((1, 1), (1, 1), ((0, 0), (0, 0)), jnp.float32, (11, 7), 40),  # reducing 1x1 (40 -> 24)
    ((1, 1), (2, 2), ((0, 0), (0, 0)), jnp.bfloat16, (11, 7), 40),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), jnp.float32, (11, 7), 16),  # the convolution path
    ((7, 7), (2, 2), ((3, 3), (3, 3)), jnp.float32, (11, 7), 16),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), jnp.float32, (4, 2), 16),  # im2col (small maps)
    ((3, 3), (2, 2), ((1, 1), (1, 1)), jnp.float32, (5, 3), 16),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16, (4, 4), 16),
  ],
)
def test_conv_equals_flax_conv(kernel, strides, padding, dtype, hw, c_in):
  """cpu_kernels.Conv: nn.Conv(use_bias=False)'s parameter tree and numbers on every path.

  1x1 kernels (16 -> 24 expanding, 40 -> 24 reducing) take the matmul path with its
  custom kernel gradient; small maps the im2col path, which shares it.
  """
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + hw + (c_in,), jnp.float32)
  ours = cpu_kernels.Conv(24, kernel, strides, padding, dtype=dtype, kernel_init=conv_init)
  ref = nn.Conv(24, kernel, strides, padding, use_bias=False, dtype=dtype, kernel_init=conv_init)
  params = ours.init(jax.random.PRNGKey(1), x)
  ref_params = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)
  np.testing.assert_array_equal(params["params"]["kernel"], ref_params["params"]["kernel"])
  y, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol, rtol=tol
  )

  # Gradients with respect to input and kernel agree too.
  def loss(module, p, x):
    return jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

  g = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=10 * tol, rtol=10 * tol
    )


@pytest.mark.parametrize("c_in", [16, 24, 40])
def test_1x1_kernel_gradient_equals_the_sum_over_pixels(c_in):
  """Expanding, square and reducing 1x1 layers: the custom kernel gradient is x^T dy summed
  over every pixel of the batch (a float64 einsum)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, c_in))
  conv = cpu_kernels.Conv(24, (1, 1))
  params = conv.init(jax.random.PRNGKey(1), x)
  weights = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3, 24))
  grad = jax.grad(lambda p: jnp.sum(conv.apply(p, x) * weights))
  expected = np.einsum("nhwi,nhwo->io", np.asarray(x, np.float64), np.asarray(weights, np.float64))
  np.testing.assert_allclose(grad(params)["params"]["kernel"][0, 0], expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(1, 4, 6, 5, 8), (3, 4, 3, 2, 5)])
def test_batch_norm_closed_form_gradient_equals_autodiff(shape):
  """The training batch norm's custom VJP (sums of dy and dy * (x - mean)) gives autodiff's
  gradients of the two-pass formula, per group, including through the returned mean and
  variance, which feed the running statistics."""
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  xg = jax.random.normal(keys[0], shape) * 2 + 0.5
  scale = jax.random.uniform(keys[1], shape[-1:]) + 0.5
  bias = jax.random.normal(keys[2], shape[-1:])
  w_y = jax.random.normal(keys[3], shape)
  w_mean, w_var = (jax.random.normal(k, (shape[0], shape[-1])) for k in keys[4:])

  def loss(bn):
    def f(xg, scale, bias):
      y, mean, var = bn(xg, scale, bias, 1e-5)
      return jnp.sum(jnp.sin(y) * w_y) + jnp.sum(mean * w_mean) + jnp.sum(var * w_var)

    return f

  closed_form, autodiff = cpu_kernels.batch_norm_train, layers.batch_norm_groups
  for a, b in zip(closed_form(xg, scale, bias, 1e-5), autodiff(xg, scale, bias, 1e-5)):
    np.testing.assert_array_equal(a, b)
  ours = jax.grad(loss(closed_form), argnums=(0, 1, 2))(xg, scale, bias)
  ref = jax.grad(loss(autodiff), argnums=(0, 1, 2))(xg, scale, bias)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("shape,use_bias", [((8, 3, 2, 5), True), ((8, 5), False)])
def test_ghost_batch_norm_equals_the_plain_layer(shape, use_bias):
  """Same variables, bit-identical outputs and running statistics (train and eval), and the
  same gradients up to rounding, with two ghost batches."""
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=shape), jnp.float32)
  plain = layers.GhostBatchNorm(group_size=4, use_bias=use_bias)
  cpu = cpu_kernels.GhostBatchNorm(group_size=4, use_bias=use_bias)
  variables = plain.init(KEY, x, use_running_average=False)
  assert jax.tree_util.tree_structure(
    cpu.init(KEY, x, use_running_average=False)
  ) == jax.tree_util.tree_structure(variables)
  params = jax.tree.map(lambda p: p + jnp.linspace(0.5, 1.5, p.shape[-1]), variables["params"])
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  w = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)

  def train(module):
    def loss(params, x):
      y, updates = module.apply(
        {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
      )
      return jnp.sum(jnp.sin(y) * w), (y, updates)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (_, (y_cpu, upd_cpu)), g_cpu = train(cpu)
  (_, (y_plain, upd_plain)), g_plain = train(plain)
  np.testing.assert_array_equal(y_cpu, y_plain)
  for a, b in zip(jax.tree.leaves(upd_cpu), jax.tree.leaves(upd_plain)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  np.testing.assert_array_equal(
    cpu.apply(variables, x, use_running_average=True),
    plain.apply(variables, x, use_running_average=True),
  )


# ------------------------------------------------------------------------ residual ReLU


def test_residual_relu_equals_relu_bit_for_bit_values_and_gradients():
  """Values and gradients of residual_relu are nn.relu's exactly, zeros, -0.0, inf and NaN
  included (a non-finite first element does not spread to the others), float32 and bf16."""
  residual_relu = cpu_kernels.residual_relu
  x = np.random.default_rng(3).normal(size=(2, 3, 4, 5)).astype(np.float32)
  x[0, 0, 0, 1:4] = [0.0, -0.0, 1e-30]
  x[1, 2, 3, :2] = [np.inf, -np.inf]
  for first in (0.7, -0.7, np.inf, np.nan):
    x[0, 0, 0, 0] = first
    for dtype in (jnp.float32, jnp.bfloat16):
      xs = jnp.asarray(x, dtype)
      cot = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), dtype)
      for f in (jax.jit(residual_relu), residual_relu):
        np.testing.assert_array_equal(
          np.asarray(f(xs), np.float32), np.asarray(nn.relu(xs), np.float32)
        )
        g = jax.grad(lambda v, f=f, cot=cot: jnp.sum((f(v) * cot).astype(jnp.float32)))(xs)
        g_ref = jax.grad(lambda v, cot=cot: jnp.sum((nn.relu(v) * cot).astype(jnp.float32)))(xs)
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


# ------------------------------------------------------------------------------ max pool


def _flax_pool(v):
  return nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize(
  "shape", [(2, 8, 6, 3), (1, 7, 5, 4), (2, 64, 32, 8), (1, 1, 2, 2), (1, 2, 1, 3), (1, 3, 3, 1)]
)
def test_max_pool_equals_flax_max_pool_values_and_gradients(shape):
  """The stem pool (9 strided slices) equals nn.max_pool; gradients equal, also through a ReLU
  (ties at 0: both send a window's gradient to its first maximum)."""
  max_pool = cpu_kernels.max_pool_3x3_s2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)  # continuous: no ties in a window.
  y = max_pool(x)
  np.testing.assert_array_equal(y, _flax_pool(x))
  cot = jax.random.normal(jax.random.PRNGKey(1), y.shape)
  g = jax.grad(lambda v: jnp.sum(max_pool(v) * cot))(x)
  g_ref = jax.grad(lambda v: jnp.sum(_flax_pool(v) * cot))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)
  g = jax.grad(lambda v: jnp.sum(max_pool(nn.relu(v)) * cot))(x)
  g_ref = jax.grad(lambda v: jnp.sum(_flax_pool(nn.relu(v)) * cot))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (2, 8, 7, 2), (1, 3, 4, 2)])
def test_max_pool_gradient_with_ties_goes_to_the_first_maximum_as_in_torch(shape):
  """With many tied maxima (values in {0, 1, 2}) the gradient equals torch's max_pool2d's
  (and nn.max_pool's, which the plain layer set uses)."""
  torch = pytest.importorskip("torch")
  max_pool = cpu_kernels.max_pool_3x3_s2
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, size=shape).astype(np.float32)
  y = max_pool(jnp.asarray(x))
  cot = rng.normal(size=y.shape).astype(np.float32)
  g = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(v) * cot)))(jnp.asarray(x))

  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  (yt * torch.from_numpy(cot).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_array_equal(y, yt.detach().permute(0, 2, 3, 1).numpy())
  g_t = xt.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(g, g_t, rtol=1e-6, atol=1e-6)
  g_flax = jax.grad(lambda v: jnp.sum(_flax_pool(v) * cot))(jnp.asarray(x))
  np.testing.assert_allclose(g_flax, g_t, rtol=1e-6, atol=1e-6)

  # The ties matter: differentiating the chain of maxima (ties split in halves) differs.
  def chain(v):
    return functools.reduce(jnp.maximum, cpu_kernels._pool_windows(v))

  g_split = jax.grad(lambda v: jnp.sum(chain(v) * cot))(jnp.asarray(x))
  assert not np.allclose(g_split, g_t, atol=1e-3)


def test_max_pool_keeps_bfloat16():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 4)).astype(jnp.bfloat16)
  y, vjp = jax.vjp(cpu_kernels.max_pool_3x3_s2, x)
  (g,) = vjp(jnp.ones_like(y))
  assert y.dtype == g.dtype == jnp.bfloat16
  # Each output's gradient 1 lands on exactly one input: the total is the number of outputs.
  assert float(jnp.sum(g.astype(jnp.float32))) == y.size


# --------------------------------------------------------------------------- the model


def _shapes(model, h=32, w=16):
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda im: model.init(KEY, im, train=False), x)


@pytest.mark.parametrize("depth,ibn", [(10, False), (50, True)])
def test_both_kernel_sets_have_the_same_variables(depth, ibn):
  """Same variable tree (paths, shapes, dtypes): checkpoints and weight files fit both."""
  plain = _shapes(ReIDResNet(depth=depth, width=8, ibn=ibn, kernels="plain"))
  cpu = _shapes(ReIDResNet(depth=depth, width=8, ibn=ibn, kernels="cpu"))
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(cpu)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cpu)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_both_kernel_sets_compute_the_same_model():
  """A depth-10 model (stem pool, 1x1 downsamples, im2col on the 4x2 maps of layer3-4): the same
  initial variables bit for bit, and features, running statistics and gradients equal up to
  float rounding, in train and eval mode."""
  models = {k: ReIDResNet(depth=10, width=8, bn_group_size=4, kernels=k) for k in ("plain", "cpu")}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 32, 3)), jnp.float32)
  init = {
    k: jax.jit(lambda key, im, m=m: m.init(key, im, train=False))(KEY, x[:1])
    for k, m in models.items()
  }
  for a, b in zip(jax.tree.leaves(init["plain"]), jax.tree.leaves(init["cpu"])):
    np.testing.assert_array_equal(a, b)
  variables = init["plain"]
  w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 64)), jnp.float32)

  def run(model):
    def loss(params):
      feats, updates = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(feats * w), (feats, updates["batch_stats"])

    (_, (feats, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    evaluated = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
    return feats, stats, grads, evaluated

  got, want = jax.jit(lambda: run(models["cpu"]))(), jax.jit(lambda: run(models["plain"]))()
  for name, a, b in zip(("features", "batch_stats", "gradients", "eval features"), got, want):
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      scale = float(jnp.max(jnp.abs(leaf_b)))
      np.testing.assert_allclose(leaf_a, leaf_b, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_resolve_kernels_and_create_model():
  assert resolve_kernels("auto", backend="cpu") == "cpu"
  assert resolve_kernels("auto", backend="gpu") == "plain"
  assert resolve_kernels("auto", backend="tpu") == "plain"
  assert resolve_kernels("auto") == ("cpu" if jax.default_backend() == "cpu" else "plain")
  assert resolve_kernels("plain", backend="cpu") == "plain"
  assert resolve_kernels("cpu", backend="gpu") == "cpu"
  with pytest.raises(ValueError, match="model.kernels 'fast'"):
    resolve_kernels("fast")

  fields = dict(depth=10, width=8, last_stride=1, pooling="gem", bn_group_size=4, dtype="float32")
  for kernels in ("plain", "cpu"):
    model = create_model(ml_collections.ConfigDict(dict(fields, kernels=kernels)))
    assert model.kernels == kernels
  # A config without the field (older run folders) means "auto".
  assert create_model(ml_collections.ConfigDict(fields)).kernels == resolve_kernels("auto")
  assert ReIDResNet().kernels == "plain"
  with pytest.raises(ValueError, match="resolve_kernels"):
    _shapes(ReIDResNet(depth=10, width=8, kernels="auto"))
