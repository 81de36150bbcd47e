"""Model layers and whole ResNets vs PyTorch modules with torchvision's parameter names.

The torch side is written here from docs/algorithms.md section 2: torchvision's ResNet layout
(v1.5), last stride 1, GeM with learnable p, a BatchNorm1d neck whose bias is frozen at 0,
F.normalize. Weights are random, batch-norm running statistics too, so that every mapped
tensor matters.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax.models import GeM, GhostBatchNorm, ReIDResNet

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
import torch_reid  # noqa: E402 (it imports torch: after the importorskip)

pytestmark = pytest.mark.parity


def nchw(x):
  return torch.tensor(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# ------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("p", [3.0, 2.3])
def test_gem_forward_and_gradients(p):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)  # NHWC; negatives get clamped
  x[0, 0, 0, :] = 0.0
  coef = rng.normal(size=(3, 6)).astype(np.float32)

  ref = torch_reid.TorchGeM(p)
  xt = nchw(x).requires_grad_(True)
  out_t = ref(xt)
  (out_t * torch.tensor(coef)).sum().backward()

  module = GeM()
  params = {"params": {"p": jnp.full((1,), p, jnp.float32)}}

  def loss(params, x):
    return jnp.sum(module.apply(params, x) * coef)

  out = module.apply(params, jnp.asarray(x))
  grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), out_t.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(grads["params"]["p"]), ref.p.grad.numpy(), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(grad_x), nhwc(xt.grad), rtol=1e-4, atol=1e-6)


def _random_bn_state(rng, channels):
  return {
    "weight": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    "bias": rng.normal(scale=0.2, size=channels).astype(np.float32),
    "running_mean": rng.normal(scale=0.3, size=channels).astype(np.float32),
    "running_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
  }


def _load_torch_bn(bn, state):
  with torch.no_grad():
    for name, value in state.items():
      getattr(bn, name).copy_(torch.tensor(value))


def _flax_bn_variables(state, use_bias=True):
  params = {"scale": jnp.asarray(state["weight"])}
  if use_bias:
    params["bias"] = jnp.asarray(state["bias"])
  return {
    "params": params,
    "batch_stats": {
      "mean": jnp.asarray(state["running_mean"]),
      "var": jnp.asarray(state["running_var"]),
    },
  }


def test_ghost_batch_norm_equals_per_chunk_batchnorm2d():
  """Groups of 4 in a batch of 12 = three DataParallel replicas of BatchNorm2d.

  Outputs and gradients are those of the replicas. Running statistics: each replica updates
  its own copy and DataParallel keeps replica 0's; ours is the mean of the replicas' updates.
  """
  rng = np.random.default_rng(1)
  group, batch, channels = 4, 12, 6
  x = (rng.normal(size=(batch, 3, 5, channels)) * 2 + 0.5).astype(np.float32)
  coef = rng.normal(size=x.shape).astype(np.float32)
  state = _random_bn_state(rng, channels)

  bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  _load_torch_bn(bn, state)
  bn.train()
  replicas = [copy.deepcopy(bn) for _ in range(batch // group)]
  xt = nchw(x).requires_grad_(True)
  out_t = torch.cat([rep(chunk) for rep, chunk in zip(replicas, xt.split(group))])
  (out_t * nchw(coef)).sum().backward()
  weight_grad = sum(rep.weight.grad for rep in replicas).numpy()
  bias_grad = sum(rep.bias.grad for rep in replicas).numpy()

  module = GhostBatchNorm(group_size=group, momentum=0.9, epsilon=1e-5)
  variables = _flax_bn_variables(state)

  def loss(params, x):
    y, updates = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(y * coef), (y, updates["batch_stats"])

  (_, (out, stats)), (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables["params"], jnp.asarray(x)
  )
  np.testing.assert_allclose(np.asarray(out), nhwc(out_t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_x), nhwc(xt.grad), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["scale"]), weight_grad, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads["bias"]), bias_grad, rtol=1e-4, atol=1e-4)

  mean_of_replicas = np.mean([rep.running_mean.numpy() for rep in replicas], axis=0)
  var_of_replicas = np.mean([rep.running_var.numpy() for rep in replicas], axis=0)
  np.testing.assert_allclose(np.asarray(stats["mean"]), mean_of_replicas, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["var"]), var_of_replicas, rtol=1e-5, atol=1e-6)
  # The documented difference: DataParallel would keep replica 0's statistics only.
  assert not np.allclose(np.asarray(stats["mean"]), replicas[0].running_mean.numpy(), atol=1e-3)

  # Eval mode uses the running statistics, as BatchNorm2d.eval() does.
  bn.eval()
  out_eval = module.apply(variables, jnp.asarray(x), use_running_average=True)
  np.testing.assert_allclose(np.asarray(out_eval), nhwc(bn(nchw(x))), rtol=1e-5, atol=1e-5)


def test_neck_batchnorm1d_with_frozen_zero_bias():
  rng = np.random.default_rng(2)
  batch, channels = 8, 10
  x = (rng.normal(size=(batch, channels)) * 3 + 1).astype(np.float32)
  coef = rng.normal(size=x.shape).astype(np.float32)
  state = _random_bn_state(rng, channels)
  state["bias"] = np.zeros(channels, np.float32)

  neck = nn.BatchNorm1d(channels)
  _load_torch_bn(neck, state)
  neck.bias.requires_grad_(False)
  neck.train()
  xt = torch.tensor(x, requires_grad=True)
  out_t = neck(xt)
  (out_t * torch.tensor(coef)).sum().backward()
  assert neck.bias.grad is None

  module = GhostBatchNorm(group_size=64, use_bias=False)
  variables = _flax_bn_variables(state, use_bias=False)

  def loss(params, x):
    y, updates = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(y * coef), (y, updates["batch_stats"])

  (_, (out, stats)), (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables["params"], jnp.asarray(x)
  )
  assert set(grads) == {"scale"}, "the neck's bias must not be a trained parameter"
  np.testing.assert_allclose(np.asarray(out), out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_x), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(grads["scale"]), neck.weight.grad.numpy(), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(stats["mean"]), neck.running_mean.numpy(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(stats["var"]), neck.running_var.numpy(), rtol=1e-5, atol=1e-6
  )
  neck.eval()  # both now hold the statistics updated by the train-mode pass
  out_eval = module.apply(
    {"params": variables["params"], "batch_stats": stats}, jnp.asarray(x), use_running_average=True
  )
  np.testing.assert_allclose(
    np.asarray(out_eval), neck(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5
  )


# ------------------------------------------------------------------------------------ ResNet


def _randomise(model, seed):
  """Kaiming conv weights (torchvision's init) and random BN affine + running statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, nn.Conv2d):
        fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        module.weight.copy_(
          torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5
        )
      elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        c = module.num_features
        module.weight.copy_(0.5 + torch.rand(c, generator=gen))
        if name != "feat_bn":
          module.bias.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
    model.gem.p.fill_(2.7)


def _to_flax(model, depth):
  """State dict -> Flax variables: the trunk through models.weights, the neck by hand."""
  from ccreid_jax.models import weights

  state = {k: v.numpy() for k, v in model.state_dict().items()}
  trunk = {k: v for k, v in state.items() if not k.startswith(("gem.", "feat_bn."))}
  variables = weights.torchvision_to_flax(trunk, depth=depth)
  variables["params"]["gem"] = {"p": state["gem.p"]}
  variables["params"]["feat_bn"] = {"scale": state["feat_bn.weight"]}
  variables["batch_stats"]["feat_bn"] = {
    "mean": state["feat_bn.running_mean"],
    "var": state["feat_bn.running_var"],
  }
  return jax.tree.map(jnp.asarray, variables)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_features_and_train_mode_stats_match_torch(depth):
  rng = np.random.default_rng(depth)
  images = rng.normal(size=(2, 64, 32, 3)).astype(np.float32)
  ref = torch_reid.TorchReIDResNet(depth)
  _randomise(ref, seed=depth)
  variables = _to_flax(ref, depth)
  model = ReIDResNet(depth=depth, width=64, last_stride=1, pooling="gem", bn_group_size=64)

  # Every parameter and statistic of the Flax model is provided, with the right shape.
  abstract = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.PRNGKey(0), jnp.asarray(images)
  )
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, variables)

  ref.eval()
  with torch.no_grad():
    want = ref(nchw(images)).numpy()
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  got = np.asarray(apply(variables, jnp.asarray(images), train=False))
  assert got.shape == (2, 512 if depth == 18 else 2048)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  assert np.abs(want).max() > 1e-3

  # One train-mode forward (one ghost group = the batch): the running statistics of every
  # batch norm move exactly as torch's do.
  ref.train()
  with torch.no_grad():
    want_train = ref(nchw(images)).numpy()
  got_train, updates = apply(variables, jnp.asarray(images), train=True, mutable=("batch_stats",))
  # The neck normalises over 2 samples, so channels where they nearly agree amplify rounding
  # differences (eps-dominated): compare the directions, not every coordinate.
  cosine = np.sum(np.asarray(got_train) * want_train, axis=1)
  np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
  torch_stats = {
    k: v.numpy() for k, v in ref.state_dict().items() if k.endswith(("running_mean", "running_var"))
  }
  flat = _flatten(updates["batch_stats"])
  assert len(flat) == len(torch_stats)
  for key, value in torch_stats.items():
    # Float32 rounding after up to 50 layers: within 1e-4 of each statistic's scale.
    np.testing.assert_allclose(
      flat[_flax_path(key)], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=key
    )


def _flax_path(torch_key):
  """``layer2.0.downsample.1.running_var`` -> ``layer2_0/downsample_bn/var``."""
  module, field = torch_key.rsplit(".", 1)
  leaf = {"running_mean": "mean", "running_var": "var"}[field]
  parts = module.split(".")
  if parts[0].startswith("layer"):
    block = f"{parts[0]}_{parts[1]}"
    rest = parts[2:]
    if rest[:1] == ["downsample"]:
      rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
    return "/".join([block] + rest + [leaf])
  return f"{module}/{leaf}"
