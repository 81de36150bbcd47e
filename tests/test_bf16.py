"""Mixed precision: ``config.model.dtype = "bfloat16"`` computes the convolutions in bf16
while parameters, optimizer state, batch statistics, features, memory logits and the loss
stay float32."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import distributed, models, train
from ccreid_jax import memory as memory_lib
from ccreid_jax import state as state_lib
from ccreid_jax.distributed import make_mesh
from ccreid_jax.extract import make_extract_fn

from conftest import tiny_config


def _setup(dtype: str):
  config = tiny_config("unused")
  config.model.dtype = dtype
  config.model.bn_group_size = 8
  # A fixed batch seen the same way every step: no augmentation, and the memory frozen
  # (momentum 1 keeps every row), so the loss measures only the gradient steps.
  config.augment.flip_prob = 0.0
  config.augment.pad = 0
  config.augment.erasing_prob = 0.0
  config.memory.momentum = 1.0
  model = models.create_model(config.model)
  tx = state_lib.make_optimizer(config.optim, config.train.iters)
  rng = np.random.default_rng(0)
  centroids = rng.normal(size=(6, models.feature_dim(10, 8))).astype(np.float32)
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  state = state_lib.create_train_state(
    model, config, tx=tx, memory=memory_lib.init_memory(centroids, 16)
  )
  images = rng.integers(0, 256, size=(32, 32, 16, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(8) % 6, 4).astype(np.int32)
  return config, model, tx, state, images, labels


def _float_dtypes(tree) -> set:
  return {
    np.dtype(x.dtype)
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  }


@pytest.fixture(scope="module")
def runs():
  """Four steps on one fixed batch, in float32 and in bfloat16."""
  mesh = make_mesh()
  out = {}
  for dtype in ("float32", "bfloat16"):
    config, model, _, state, images, labels = _setup(dtype)
    # Replicated over the mesh up front, as train_and_evaluate does, so that the step's
    # input shardings are those of its outputs and it compiles once, not twice.
    state = distributed.replicate(state, mesh)
    step = train.make_train_step(config, mesh)
    features = make_extract_fn(model, mesh)(state.variables, images)
    losses = []
    for _ in range(4):
      state, metrics = step(state, images, labels)
      losses.append(metrics["loss"])
    out[dtype] = dict(model=model, state=state, losses=losses, features=features)
  return out


def test_bf16_model_computes_in_bf16():
  _, model, _, state, images, _ = _setup("bfloat16")
  assert model.dtype == jnp.bfloat16
  fmap = model.apply(
    state.variables, jnp.asarray(images, jnp.float32), train=False, return_feature_map=True
  )
  assert fmap.dtype == jnp.bfloat16


def test_params_and_optimizer_state_stay_float32(runs):
  state = runs["bfloat16"]["state"]
  for tree in (state.params, state.opt_state, state.batch_stats, state.memory):
    assert _float_dtypes(tree) == {np.dtype(np.float32)}


def test_features_and_loss_are_float32(runs):
  bf16 = runs["bfloat16"]
  assert bf16["features"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(bf16["features"]), axis=1), 1.0, atol=1e-5)
  assert all(loss.dtype == jnp.float32 for loss in bf16["losses"])
  # The memory logits are float32 even for bf16 features.
  logits = memory_lib.memory_logits(
    bf16["features"].astype(jnp.bfloat16), bf16["state"].memory.centroids, 0.05
  )
  assert logits.dtype == jnp.float32


def test_bf16_loss_is_close_to_float32_loss(runs):
  f32 = float(runs["float32"]["losses"][0])
  bf16 = float(runs["bfloat16"]["losses"][0])
  assert np.isfinite(bf16)
  assert bf16 == pytest.approx(f32, rel=0.03)
  # ... and the features agree closely too (cosine of unit vectors).
  cos = np.sum(
    np.asarray(runs["float32"]["features"]) * np.asarray(runs["bfloat16"]["features"]), axis=1
  )
  assert cos.min() > 0.98


def test_bf16_steps_decrease_the_loss_on_a_fixed_batch(runs):
  losses = [float(x) for x in runs["bfloat16"]["losses"]]
  assert all(np.isfinite(losses))
  assert all(b < a for a, b in itertools.pairwise(losses)), losses
  assert losses[-1] < 0.5 * losses[0], losses
  # bf16 follows the float32 trajectory to within a few percent.
  f32 = [float(x) for x in runs["float32"]["losses"]]
  np.testing.assert_allclose(losses, f32, rtol=0.05)
