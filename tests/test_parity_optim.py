"""Optimizer and lr schedule vs torch.optim.Adam(weight_decay=...) + StepLR."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccreid_jax import state as state_lib

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity


def _config_optim():
  from ccreid_jax.configs import default

  return default.get_config().optim


def _initial_params(seed):
  """A few tensors shaped like the model's: conv kernel, BN scale/bias, GeM p, neck scale."""
  rng = np.random.default_rng(seed)
  return {
    "conv": rng.normal(scale=0.1, size=(3, 3, 4, 8)).astype(np.float32),
    "bn_scale": rng.uniform(0.5, 1.5, size=(8,)).astype(np.float32),
    "bn_bias": rng.normal(scale=0.1, size=(8,)).astype(np.float32),
    "gem_p": np.full((1,), 3.0, np.float32),
    "neck_scale": np.ones((8,), np.float32),
  }


def _coefficients(params, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}


def _jax_loss(params, coef, step):
  # A smooth, non-quadratic loss whose gradient changes from step to step.
  return sum(jnp.sum(jnp.sin(params[k] * (1.0 + 0.1 * step)) * coef[k]) for k in params)


def _torch_loss(params, coef, step):
  return sum(torch.sum(torch.sin(params[k] * (1.0 + 0.1 * step)) * coef[k]) for k in params)


def run_torch(init, coef, steps, optim, iters_per_epoch, decoupled=False):
  """torch Adam over the trainable tensors; a frozen neck bias is left out as the reference does."""
  params = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
  frozen_bias = torch.zeros(8, requires_grad=False)
  tensors = [t for t in list(params.values()) + [frozen_bias] if t.requires_grad]
  opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
  opt = opt_cls(tensors, lr=optim.lr, weight_decay=optim.weight_decay)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=optim.step_size, gamma=optim.gamma)
  coef_t = {k: torch.tensor(v) for k, v in coef.items()}
  for step in range(steps):
    opt.zero_grad()
    _torch_loss(params, coef_t, step).backward()
    opt.step()
    if (step + 1) % iters_per_epoch == 0:
      sched.step()  # the reference steps its scheduler once per epoch
  assert not frozen_bias.any()
  return {k: v.detach().numpy() for k, v in params.items()}


def run_jax(init, coef, steps, optim, iters_per_epoch):
  tx = state_lib.make_optimizer(optim, iters_per_epoch)
  params = jax.tree.map(jnp.asarray, init)
  coef = jax.tree.map(jnp.asarray, coef)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, step):
    grads = jax.grad(_jax_loss)(params, coef, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for step in range(steps):
    params, opt_state = step_fn(params, opt_state, jnp.float32(step))
  return jax.tree.map(np.asarray, params)


def test_adam_coupled_weight_decay_five_steps():
  optim = _config_optim()
  init = _initial_params(0)
  coef = _coefficients(init, 1)
  want = run_torch(init, coef, 5, optim, iters_per_epoch=200)
  got = run_jax(init, coef, 5, optim, iters_per_epoch=200)
  for k in init:
    assert not np.array_equal(got[k], init[k])
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def test_adam_across_lr_steps_with_step_lr():
  """One step per epoch for 45 epochs: the lr drops after epochs 20 and 40 in both."""
  optim = _config_optim()
  init = _initial_params(2)
  coef = _coefficients(init, 3)
  want = run_torch(init, coef, 45, optim, iters_per_epoch=1)
  got = run_jax(init, coef, 45, optim, iters_per_epoch=1)
  for k in init:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def test_lr_schedule_matches_step_lr():
  optim = _config_optim()
  iters = 7
  schedule = state_lib.make_lr_schedule(optim, iters)
  opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=optim.lr)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=optim.step_size, gamma=optim.gamma)
  for epoch in range(50):
    want = opt.param_groups[0]["lr"]
    for it in range(iters):
      assert float(schedule(jnp.int32(epoch * iters + it))) == pytest.approx(want, rel=1e-6)
    opt.step()  # no gradients: a no-op that keeps StepLR's call-order check quiet
    sched.step()
