"""ReIDResNet, GhostBatchNorm and GeM: shapes, names, numerics against numpy.

The CPU kernel set (models/cpu_kernels.py) is compared with these layers in
tests/test_cpu_kernels.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccreid_jax.models import GeM, GhostBatchNorm, ReIDResNet, create_model, feature_dim
from ccreid_jax.models.resnet import conv_init

KEY = jax.random.key(0)


def _images(batch, h=32, w=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, h, w, 3)), jnp.float32)


def _variables(model, x, seed=0):
  """Variables shaped by model.init, filled with numpy: compiling init's random number
  generation costs far more on CPU than the forward passes these tests need. Kernels
  follow the same kaiming fan-out normal as the real init (checked on its own below)."""
  shapes = jax.eval_shape(lambda im: model.init(KEY, im, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_out), leaf.shape), leaf.dtype)
    values = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0, "p": 3.0}[name]
    return jnp.full(leaf.shape, values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- GhostBatchNorm


def _np_bn_train(x, groups, scale, bias, eps=1e-5):
  """Per-chunk batch norm (biased variance) in float64, and the per-chunk stats."""
  x = x.astype(np.float64)
  chunks = np.split(x, groups, axis=0)
  axes = tuple(range(x.ndim - 1))
  out, means, unbiased = [], [], []
  for c in chunks:
    mean = c.mean(axis=axes)
    var = c.var(axis=axes)
    out.append((c - mean) / np.sqrt(var + eps) * scale + bias)
    n = c.size // c.shape[-1]
    means.append(mean)
    unbiased.append(var * n / (n - 1))
  return np.concatenate(out), np.mean(means, axis=0), np.mean(unbiased, axis=0)


def _bn_variables(bn, x, seed=1):
  variables = bn.init(KEY, x, use_running_average=False)
  rng = np.random.default_rng(seed)
  c = x.shape[-1]
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}
  if "bias" in variables["params"]:
    params["bias"] = jnp.asarray(rng.normal(size=c), jnp.float32)
  return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize(
  "shape,group_size,groups",
  [
    ((8, 3, 2, 5), 4, 2),  # B = 2 * group_size: two ghost batches
    ((12, 3, 2, 5), 4, 3),  # three ghost batches
    ((8, 5), 4, 2),  # 2-D input
    ((6, 3, 2, 5), 4, 1),  # B not a multiple of group_size: whole batch
    ((4, 3, 2, 5), 4, 1),  # B == group_size: whole batch
  ],
)
def test_ghost_bn_training_matches_per_chunk_numpy(shape, group_size, groups):
  x = np.random.default_rng(0).normal(2.0, 3.0, size=shape).astype(np.float32)
  bn = GhostBatchNorm(group_size=group_size)
  variables = _bn_variables(bn, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["mean"]), 0.0)
  np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["var"]), 1.0)
  y, updates = bn.apply(
    variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"]
  )
  scale = np.asarray(variables["params"]["scale"])
  bias = np.asarray(variables["params"]["bias"])
  ref, mean, unbiased = _np_bn_train(x, groups, scale, bias)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  # ra = 0.9 * ra + 0.1 * (mean over groups of each group's mean / unbiased variance)
  np.testing.assert_allclose(
    np.asarray(updates["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(updates["batch_stats"]["var"]), 0.9 + 0.1 * unbiased, rtol=1e-5
  )
  if groups > 1:  # the ghost batches really differ from whole-batch normalisation
    whole, _, _ = _np_bn_train(x, 1, scale, bias)
    assert np.abs(whole - ref).max() > 1e-2


def test_ghost_bn_eval_uses_running_stats():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 2, 2, 5)).astype(np.float32)
  bn = GhostBatchNorm(group_size=4)
  variables = _bn_variables(bn, jnp.asarray(x))
  mean = rng.normal(size=5).astype(np.float32)
  var = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
  variables["batch_stats"] = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
  y = bn.apply(variables, jnp.asarray(x), use_running_average=True)
  scale = np.asarray(variables["params"]["scale"])
  bias = np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(
    np.asarray(y), (x - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5
  )


def test_ghost_bn_without_bias_and_bfloat16():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.bfloat16)
  bn = GhostBatchNorm(group_size=4, use_bias=False, dtype=jnp.bfloat16)
  variables = bn.init(KEY, x, use_running_average=False)
  assert set(variables["params"]) == {"scale"}
  assert variables["params"]["scale"].dtype == jnp.float32
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updates["batch_stats"]["var"].dtype == jnp.float32
  ref, _, _ = _np_bn_train(np.asarray(x.astype(jnp.float32)), 2, 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=3e-2)


def test_ghost_bn_axis_name_pools_statistics_across_devices():
  """With axis_name, group g of every device forms one group (here: 2 devices x 4 = 8)."""
  x = np.random.default_rng(5).normal(1.0, 2.0, size=(2, 4, 3, 5)).astype(np.float32)
  bn = GhostBatchNorm(group_size=4, axis_name="devices")
  variables = _bn_variables(GhostBatchNorm(group_size=4), jnp.asarray(x[0]))

  def per_device(xd):
    return bn.apply(variables, xd, use_running_average=False, mutable=["batch_stats"])

  y, updates = jax.vmap(per_device, axis_name="devices")(jnp.asarray(x))
  scale = np.asarray(variables["params"]["scale"])
  bias = np.asarray(variables["params"]["bias"])
  ref, mean, unbiased = _np_bn_train(x.reshape(8, 3, 5), 1, scale, bias)
  np.testing.assert_allclose(np.asarray(y).reshape(8, 3, 5), ref, rtol=1e-5, atol=1e-5)
  for d in range(2):
    np.testing.assert_allclose(
      np.asarray(updates["batch_stats"]["var"][d]), 0.9 + 0.1 * unbiased, rtol=1e-5
    )
    np.testing.assert_allclose(
      np.asarray(updates["batch_stats"]["mean"][d]), 0.1 * mean, rtol=1e-5, atol=1e-6
    )

  # Its gradient (autodiff through the collectives) is that of one device holding all 8
  # (the closed-form VJP): input, scale and bias.
  w = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 3, 5)).astype(np.float32))

  def pooled_loss(params, xs):
    out = jax.vmap(
      lambda xd: bn.apply(
        {**variables, "params": params}, xd, use_running_average=False, mutable=["batch_stats"]
      )[0],
      axis_name="devices",
    )(xs)
    return jnp.sum(out * w)

  def single_loss(params, xs):
    out = GhostBatchNorm(group_size=8).apply(
      {**variables, "params": params},
      xs.reshape(8, 3, 5),
      use_running_average=False,
      mutable=["batch_stats"],
    )[0]
    return jnp.sum(out * w.reshape(8, 3, 5))

  got = jax.grad(pooled_loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))
  want = jax.grad(single_loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- GeM


def _np_gem(x, p, eps=1e-6):
  return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def test_gem_matches_numpy_and_p_gets_gradient():
  x = np.random.default_rng(4).normal(size=(2, 3, 4, 5)).astype(np.float32)  # some < eps
  gem = GeM()
  variables = gem.init(KEY, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(variables["params"]["p"]), [3.0])
  y = gem.apply(variables, jnp.asarray(x))
  assert y.shape == (2, 5) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _np_gem(x.astype(np.float64), 3.0), rtol=1e-5)

  def total(params):
    return jnp.sum(gem.apply({"params": params}, jnp.asarray(x)))

  grad_p = float(jax.grad(total)(variables["params"])["p"][0])
  h = 1e-4
  fd = (
    _np_gem(x.astype(np.float64), 3.0 + h).sum() - _np_gem(x.astype(np.float64), 3.0 - h).sum()
  ) / (2 * h)
  assert abs(grad_p) > 1e-3
  np.testing.assert_allclose(grad_p, fd, rtol=1e-3)

  fixed = GeM(learnable=False)
  assert not fixed.init(KEY, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(fixed.apply({}, jnp.asarray(x))), np.asarray(y), rtol=1e-6)


# -------------------------------------------------------------------------------- ResNet


def test_feature_dim():
  assert feature_dim(10, 8) == 64
  assert feature_dim(18, 64) == 512
  assert feature_dim(34, 64) == 512
  assert feature_dim(50, 64) == 2048
  assert feature_dim(101, 16) == 512
  with pytest.raises(ValueError):
    feature_dim(42, 64)


@pytest.mark.parametrize("depth,width", [(10, 8), (18, 8)])
def test_output_is_unit_norm_in_train_and_eval(depth, width):
  model = ReIDResNet(depth=depth, width=width, bn_group_size=4)
  x = _images(8)
  variables = _variables(model, x)

  @jax.jit
  def train_fwd(v, im):
    return model.apply(v, im, train=True, mutable=["batch_stats"])

  eval_fwd = jax.jit(lambda v, im: model.apply(v, im, train=False))
  out, updates = train_fwd(variables, x)
  assert out.shape == (8, feature_dim(depth, width)) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-5)
  # The training pass moved the running stats of every BN, the neck included.
  for name in ("bn1", "feat_bn"):
    assert not np.allclose(np.asarray(updates["batch_stats"][name]["var"]), 1.0)

  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  out_eval = eval_fwd(variables, x)
  assert out_eval.shape == out.shape and out_eval.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out_eval), axis=1), 1.0, rtol=1e-5)

  # Eval mode: a sample's feature does not depend on the rest of the batch (running stats).
  other = x.at[1:].set(_images(7, seed=9))
  np.testing.assert_allclose(
    np.asarray(eval_fwd(variables, other))[0], np.asarray(out_eval)[0], rtol=1e-5, atol=1e-6
  )
  # Train mode: it does (batch statistics).
  out_other, _ = train_fwd(variables, other)
  assert np.abs(np.asarray(out_other)[0] - np.asarray(out)[0]).max() > 1e-4


def test_depth50_smoke_and_gradients():
  model = ReIDResNet(depth=50, width=8, bn_group_size=4)
  x = _images(8)
  variables = _variables(model, x)
  out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, x)
  assert out.shape == (8, 256)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-5)

  @jax.jit
  def grads(params):
    def loss(p):
      feats, _ = model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.sum(feats[:, :5] * jnp.arange(5.0))

    return jax.grad(loss)(params)

  g = grads(variables["params"])
  # Gradients reach the stem, GeM's p and the neck's scale.
  for path in (
    ("conv1", "kernel"),
    ("gem", "p"),
    ("feat_bn", "scale"),
    ("layer4_2", "bn3", "bias"),
  ):
    leaf = g
    for key in path:
      leaf = leaf[key]
    assert np.all(np.isfinite(np.asarray(leaf))) and np.abs(np.asarray(leaf)).max() > 0, path


@pytest.mark.parametrize("last_stride,expected", [(1, (16, 8)), (2, (8, 4))])
def test_last_stride_feature_map_size(last_stride, expected):
  model = ReIDResNet(depth=10, width=8, last_stride=last_stride)
  x = jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  variables = jax.eval_shape(lambda im: model.init(KEY, im, train=False), x)
  fmap = jax.eval_shape(
    lambda v, im: model.apply(v, im, train=False, return_feature_map=True), variables, x
  )
  assert fmap.shape == (2,) + expected + (64,)
  bottleneck = ReIDResNet(depth=50, width=8, last_stride=last_stride)
  variables = jax.eval_shape(lambda im: bottleneck.init(KEY, im, train=False), x)
  fmap = jax.eval_shape(
    lambda v, im: bottleneck.apply(v, im, train=False, return_feature_map=True), variables, x
  )
  assert fmap.shape == (2,) + expected + (256,)


def _abstract_variables(model, h=32, w=16):
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda im: model.init(KEY, im, train=False), x)


def test_param_names_follow_torchvision():
  variables = _abstract_variables(ReIDResNet(depth=50, width=8))
  params = variables["params"]
  blocks = [f"layer{s}_{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for i in range(n)]
  assert set(params) == {"conv1", "bn1", "gem", "feat_bn", *blocks}
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 8)
  assert set(params["layer1_0"]) == {
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "conv3",
    "bn3",
    "downsample_conv",
    "downsample_bn",
  }
  assert set(params["layer4_0"]) >= {"downsample_conv", "downsample_bn"}
  assert params["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 128, 256)
  assert params["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  assert "downsample_conv" not in params["layer4_1"]
  assert set(params["feat_bn"]) == {"scale"}  # neck bias fixed at 0: no param
  assert params["feat_bn"]["scale"].shape == (256,)
  assert params["gem"]["p"].shape == (1,)
  assert set(variables["batch_stats"]["feat_bn"]) == {"mean", "var"}
  assert set(variables["batch_stats"]["layer2_0"]["downsample_bn"]) == {"mean", "var"}
  assert not any("bias" in path for path in _paths(params) if "conv" in path)

  basic = _abstract_variables(ReIDResNet(depth=10, width=8, pooling="avg"))["params"]
  assert "gem" not in basic
  assert set(basic["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}  # no shape change
  assert set(basic["layer2_0"]) == {
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "downsample_conv",
    "downsample_bn",
  }


def _paths(tree):
  return [
    "/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


@pytest.mark.parametrize(
  "depth,torchvision_params,dim",
  [
    (18, 11_689_512 - 513_000, 512),  # torchvision resnet18 minus its fc
    (50, 25_557_032 - 2_049_000, 2048),  # torchvision resnet50 minus its fc
  ],
)
def test_parameter_count_matches_torchvision(depth, torchvision_params, dim):
  variables = _abstract_variables(ReIDResNet(depth=depth, width=64))
  # + neck BN scale (dim) + GeM p (1)
  assert _count(variables["params"]) == torchvision_params + dim + 1


def test_bottleneck_strides_on_the_3x3_conv():
  model = ReIDResNet(depth=50, width=8)
  x = jax.ShapeDtypeStruct((1, 64, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda im: model.init(KEY, im, train=False), x)
  _, state = jax.eval_shape(
    lambda v, im: model.apply(v, im, train=False, capture_intermediates=True), variables, x
  )
  block = state["intermediates"]["layer2_0"]
  assert block["conv1"]["__call__"][0].shape == (1, 16, 8, 16)  # 1x1: full resolution
  assert block["conv2"]["__call__"][0].shape == (1, 8, 4, 16)  # 3x3: stride 2


def test_conv_init_is_kaiming_normal_fan_out():
  kernel = conv_init(KEY, (3, 3, 64, 128), jnp.float32)
  std = np.sqrt(2.0 / (3 * 3 * 128))
  np.testing.assert_allclose(float(jnp.std(kernel)), std, rtol=0.02)
  # Untruncated normal, as torch's kaiming_normal_: values beyond 2 std exist (~4.6%).
  assert float(jnp.mean(jnp.abs(kernel) > 2 * std)) > 0.03


@pytest.mark.parametrize(
  "shape,dtype",
  [((7, 7, 3, 8), jnp.float32), ((1, 1, 1024, 2048), jnp.float32), ((3, 3, 64, 128), jnp.bfloat16)],
)
def test_conv_init_equals_flax_variance_scaling_bit_for_bit(shape, dtype):
  # conv_init draws its normals as a flat vector (faster to compile); the values must be
  # exactly those of the 4-D draw, so initial weights (and the demo's numbers) are unchanged.
  # state.create_train_state runs the initialisation jitted: inside one program XLA would fold
  # the scale into the sampler's constants and round 1 ulp differently, so that must draw
  # the same values too.
  key = jax.random.PRNGKey(7)
  ours = conv_init(key, shape, dtype)
  jitted = jax.jit(conv_init, static_argnums=(1, 2))(key, shape, dtype)
  ref = nn.initializers.variance_scaling(2.0, "fan_out", "normal")(key, shape, dtype)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
  np.testing.assert_array_equal(np.asarray(jitted, np.float32), np.asarray(ref, np.float32))


def test_create_model_and_bfloat16():
  config = ml_collections.ConfigDict(
    dict(depth=10, width=8, last_stride=1, pooling="gem", bn_group_size=4, dtype="bfloat16")
  )
  model = create_model(config)
  assert isinstance(model, ReIDResNet)
  assert model.dtype == jnp.bfloat16 and model.depth == 10 and model.bn_group_size == 4
  f32 = model.clone(dtype=jnp.float32)
  x = _images(8)
  variables = _variables(f32, x)
  out16, upd16 = jax.jit(lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  out32, _ = jax.jit(lambda v, im: f32.apply(v, im, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  assert out16.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd16))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out16), axis=1), 1.0, rtol=1e-5)
  cosine = np.sum(np.asarray(out16) * np.asarray(out32), axis=1)
  assert cosine.min() > 0.98
  with pytest.raises(ValueError):
    create_model(
      ml_collections.ConfigDict(
        dict(depth=10, width=8, last_stride=1, pooling="gem", bn_group_size=4, dtype="int8")
      )
    )
