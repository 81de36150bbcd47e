"""IBN-Net ResNet-IBN-a: the IBN layer against numpy / torch, the parameter tree, the
parameter count, and create_model's arch field."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccreid_jax.models import (
  IBN,
  GhostBatchNorm,
  InstanceNorm,
  ReIDResNet,
  create_model,
  parse_arch,
)

KEY = jax.random.key(0)


def _np_ibn(x, half, in_scale, in_bias, bn_scale, bn_bias, bn_mean, bn_var, eps=1e-5):
  """IBN in eval mode, float64: per-sample per-channel instance norm on the first ``half``
  channels, running-statistics batch norm on the rest."""
  x = x.astype(np.float64)
  a, b = x[..., :half], x[..., half:]
  mean = a.mean(axis=(1, 2), keepdims=True)
  var = a.var(axis=(1, 2), keepdims=True)
  a = (a - mean) / np.sqrt(var + eps) * in_scale + in_bias
  b = (b - bn_mean) / np.sqrt(bn_var + eps) * bn_scale + bn_bias
  return np.concatenate([a, b], axis=-1)


def _ibn_variables(c, half, seed=0):
  rng = np.random.default_rng(seed)

  def r(n, lo=0.5, hi=1.5):
    return rng.uniform(lo, hi, n).astype(np.float32)

  values = dict(
    in_scale=r(half),
    in_bias=r(half, -1, 1),
    bn_scale=r(c - half),
    bn_bias=r(c - half, -1, 1),
    bn_mean=r(c - half, -1, 1),
    bn_var=r(c - half),
  )
  variables = {
    "params": {
      "IN": {"scale": values["in_scale"], "bias": values["in_bias"]},
      "BN": {"scale": values["bn_scale"], "bias": values["bn_bias"]},
    },
    "batch_stats": {"BN": {"mean": values["bn_mean"], "var": values["bn_var"]}},
  }
  return jax.tree.map(jnp.asarray, variables), values


def _ibn_layer():
  return IBN(norm=lambda name: GhostBatchNorm(group_size=64, name=name))


@pytest.mark.parametrize("channels", [8, 7])
def test_ibn_layer_eval_matches_numpy(channels):
  half = int(channels * 0.5)
  x = np.random.default_rng(1).normal(2.0, 3.0, size=(3, 5, 4, channels)).astype(np.float32)
  layer = _ibn_layer()
  shapes = jax.eval_shape(lambda: layer.init(KEY, jnp.asarray(x), use_running_average=True))
  assert shapes["params"]["IN"]["scale"].shape == (half,)
  assert shapes["params"]["BN"]["scale"].shape == (channels - half,)
  assert "IN" not in shapes["batch_stats"]  # instance norm keeps no running statistics
  variables, v = _ibn_variables(channels, half)
  out = layer.apply(variables, jnp.asarray(x), use_running_average=True)
  np.testing.assert_allclose(np.asarray(out), _np_ibn(x, half, **v), rtol=1e-5, atol=1e-5)
  # Instance norm is per sample: a sample's IN half does not depend on the others, and it
  # is the same in train mode.
  alone = layer.apply(variables, jnp.asarray(x[:1]), use_running_average=True)
  np.testing.assert_allclose(np.asarray(alone), np.asarray(out[:1]), rtol=1e-6, atol=1e-6)
  train, _ = layer.apply(
    variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(
    np.asarray(train[..., :half]), np.asarray(out[..., :half]), rtol=1e-6, atol=1e-6
  )


def test_instance_norm_output_dtype():
  x = jnp.ones((2, 3, 3, 4), jnp.bfloat16) * jnp.arange(9, dtype=jnp.bfloat16).reshape(1, 3, 3, 1)
  out, _ = InstanceNorm(dtype=jnp.bfloat16).init_with_output(KEY, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32).mean(axis=(1, 2)), 0.0, atol=1e-2)


def test_ibn_layer_matches_torch():
  torch = pytest.importorskip("torch")
  channels, half = 6, 3
  x = np.random.default_rng(2).normal(size=(2, 4, 5, channels)).astype(np.float32)
  variables, v = _ibn_variables(channels, half, seed=3)
  inorm = torch.nn.InstanceNorm2d(half, affine=True)
  bnorm = torch.nn.BatchNorm2d(channels - half).eval()
  with torch.no_grad():
    inorm.weight.copy_(torch.from_numpy(v["in_scale"]))
    inorm.bias.copy_(torch.from_numpy(v["in_bias"]))
    bnorm.weight.copy_(torch.from_numpy(v["bn_scale"]))
    bnorm.bias.copy_(torch.from_numpy(v["bn_bias"]))
    bnorm.running_mean.copy_(torch.from_numpy(v["bn_mean"]))
    bnorm.running_var.copy_(torch.from_numpy(v["bn_var"]))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    first, rest = torch.split(xt, half, 1)
    ref = torch.cat((inorm(first.contiguous()), bnorm(rest.contiguous())), 1)
  out = _ibn_layer().apply(variables, jnp.asarray(x), use_running_average=True)
  np.testing.assert_allclose(
    np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
  )


def _abstract_variables(model, h=64, w=32):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, h, w, 3)), train=False))


def test_resnet_ibn_a_parameter_tree():
  variables = _abstract_variables(ReIDResNet(depth=50, width=64, ibn=True))
  params, stats = variables["params"], variables["batch_stats"]
  assert set(params["bn1"]) == {"scale", "bias"}  # the stem is unchanged (IBN-a)
  for stage, blocks in enumerate((3, 4, 6, 3), start=1):
    planes = 64 * 2 ** (stage - 1)
    for index in range(blocks):
      block, block_stats = params[f"layer{stage}_{index}"], stats[f"layer{stage}_{index}"]
      if stage < 4:
        assert set(block["bn1"]) == {"IN", "BN"}
        assert block["bn1"]["IN"]["scale"].shape == (planes // 2,)
        assert block["bn1"]["IN"]["bias"].shape == (planes // 2,)
        assert block["bn1"]["BN"]["scale"].shape == (planes - planes // 2,)
        assert set(block_stats["bn1"]) == {"BN"}
        assert block_stats["bn1"]["BN"]["var"].shape == (planes - planes // 2,)
      else:
        assert set(block["bn1"]) == {"scale", "bias"}
        assert block["bn1"]["scale"].shape == (planes,)
      assert set(block["bn2"]) == {"scale", "bias"}


def test_resnet50_ibn_a_parameter_count():
  model = create_model(
    ml_collections.ConfigDict(
      dict(
        arch="resnet50_ibn_a",
        depth=50,
        width=64,
        last_stride=1,
        pooling="gem",
        bn_group_size=64,
        dtype="float32",
      )
    )
  )
  assert model.ibn and model.depth == 50
  params = _abstract_variables(model)["params"]

  def count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))

  trunk = {k: v for k, v in params.items() if k not in ("gem", "feat_bn")}
  # IBN-Net resnet50_ibn_a: 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
  assert count(trunk) == 25_557_032 - 2_049_000
  assert count(params) == count(trunk) + 1 + 2048  # GeM p, neck BN scale (no bias)
  plain = _abstract_variables(ReIDResNet(depth=50, width=64))
  # Same parameters as ResNet-50; IN layers drop half of layer1-3's bn1 running stats.
  assert count(plain["params"]) == count(params)
  dropped = sum(n * 64 * 2**s // 2 for s, n in enumerate((3, 4, 6)))
  assert count(plain["batch_stats"]) - count(_abstract_variables(model)["batch_stats"]) == (
    2 * dropped
  )


def test_ibn_model_train_mode_and_bfloat16():
  x = jax.ShapeDtypeStruct((4, 32, 16, 3), jnp.float32)
  model = ReIDResNet(depth=10, width=8, ibn=True, bn_group_size=2)
  variables = _abstract_variables(model, 32, 16)
  out, updates = jax.eval_shape(
    lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]), variables, x
  )
  assert out.shape == (4, 64) and out.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  assert set(updates["batch_stats"]["layer1_0"]["bn1"]) == {"BN"}
  bf16 = ReIDResNet(depth=10, width=8, ibn=True, dtype=jnp.bfloat16)
  fmap = jax.eval_shape(
    lambda v, im: bf16.apply(v, im, train=False, return_feature_map=True), variables, x
  )
  assert fmap.dtype == jnp.bfloat16 and fmap.shape == (4, 2, 1, 64)


@pytest.mark.parametrize(
  "arch,depth,expected",
  [
    ("resnet", 18, (18, False)),
    ("resnet_ibn_a", 10, (10, True)),
    ("resnet50_ibn_a", 50, (50, True)),
    ("resnet101_ibn_a", 101, (101, True)),
    ("resnet50", 50, (50, False)),
    ("ResNet50_IBN_a", None, (50, True)),
  ],
)
def test_parse_arch(arch, depth, expected):
  assert parse_arch(arch, depth) == expected


@pytest.mark.parametrize(
  "arch,depth,match",
  [
    ("resnet101_ibn_a", 50, "model.depth=101"),
    ("resnet50_ibn_b", 50, "unknown model arch"),
    ("vgg16", 50, "unknown model arch"),
    ("resnet42", None, "unsupported ResNet depth"),
  ],
)
def test_parse_arch_errors(arch, depth, match):
  with pytest.raises(ValueError, match=match):
    parse_arch(arch, depth)


def test_create_model_without_arch_is_plain_resnet():
  config = ml_collections.ConfigDict(
    dict(depth=18, width=8, last_stride=1, pooling="avg", bn_group_size=64, dtype="float32")
  )
  model = create_model(config)
  assert model.depth == 18 and not model.ibn
  config.arch = "resnet_ibn_a"
  assert create_model(config).ibn
