"""Cluster memory: loss, gradient, momentum updates and padding, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import memory as mem

TAU = 0.05


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _problem(seed, batch=12, clusters=5, dim=8):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 3.0, size=(batch, 1))
  centroids = _unit(rng.normal(size=(clusters, dim)))
  labels = rng.integers(0, clusters, size=batch)
  return feats, centroids, labels


def _np_loss_and_grad(x, m, y, tau):
  """Float64 loss and its hand-derived gradient w.r.t. the UN-normalised features."""
  x = x.astype(np.float64)
  m = m.astype(np.float64)
  b = x.shape[0]
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  f = x / norm
  z = f @ m.T / tau
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  loss = -np.mean(np.log(p[np.arange(b), y]))
  onehot = np.eye(m.shape[0])[y]
  g_z = (p - onehot) / b
  g_f = g_z @ m / tau
  # d(x/|x|)/dx = (I - f f^T) / |x|
  g_x = (g_f - np.sum(g_f * f, axis=1, keepdims=True) * f) / norm
  return loss, g_x


def _np_sequential_update(m, x, y, mu):
  m = m.astype(np.float64).copy()
  x = _unit(x.astype(np.float64))
  for b in range(len(y)):
    m[y[b]] = mu * m[y[b]] + (1 - mu) * x[b]
    m[y[b]] /= np.linalg.norm(m[y[b]])
  return m


def _np_hard_update(m, x, y, mu):
  old = m.astype(np.float64)
  new = old.copy()
  x = _unit(x.astype(np.float64))
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    cos = x[idx] @ old[c]
    hardest = idx[np.argmin(cos)]  # argmin: first in batch order on ties
    row = mu * old[c] + (1 - mu) * x[hardest]
    new[c] = row / np.linalg.norm(row)
  return new


def test_loss_and_gradient_match_numpy():
  x, m, y = _problem(0)
  loss, grad = jax.value_and_grad(mem.contrastive_loss)(
    jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32), jnp.asarray(y), TAU
  )
  ref_loss, ref_grad = _np_loss_and_grad(x, m, y, TAU)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)
  # The hand gradient is orthogonal to each feature (scale invariance of the loss).
  assert np.allclose(np.sum(np.asarray(grad) * x, axis=1), 0.0, atol=1e-5)


def test_centroids_receive_no_gradient():
  x, m, y = _problem(1)
  g = jax.grad(mem.contrastive_loss, argnums=1)(
    jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32), jnp.asarray(y), TAU
  )
  assert np.all(np.asarray(g) == 0.0)


def test_padding_does_not_change_loss_or_gradient():
  x, m, y = _problem(2, clusters=7)
  state = mem.init_memory(m, bucket=16)
  assert state.centroids.shape == (16, m.shape[1])
  assert int(state.num_clusters) == 7
  np.testing.assert_array_equal(np.asarray(state.valid), np.arange(16) < 7)
  np.testing.assert_array_equal(np.asarray(state.centroids[7:]), 0.0)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  fn = jax.value_and_grad(mem.contrastive_loss)
  l_pad, g_pad = fn(xj, state.centroids, yj, TAU, state.valid)
  l_ref, g_ref = fn(xj, jnp.asarray(m, jnp.float32), yj, TAU)
  np.testing.assert_allclose(float(l_pad), float(l_ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_pad), np.asarray(g_ref), rtol=1e-5, atol=1e-8)
  # Without the mask, the zero rows would take probability (logit 0 is not negligible).
  l_unmasked = mem.contrastive_loss(xj, state.centroids, yj, TAU)
  assert abs(float(l_unmasked) - float(l_ref)) > 1e-3
  probs = jax.nn.softmax(mem.memory_logits(xj, state.centroids, TAU, state.valid))
  assert np.all(np.asarray(probs[:, 7:]) == 0.0)


def test_soft_loss_with_one_hot_targets_equals_hard_loss():
  x, m, y = _problem(3, clusters=6)
  state = mem.init_memory(m, bucket=8)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  targets = jax.nn.one_hot(yj, 8)
  hard = mem.contrastive_loss(xj, state.centroids, yj, TAU, state.valid)
  soft = mem.soft_contrastive_loss(xj, state.centroids, targets, TAU, state.valid)
  assert abs(float(hard) - float(soft)) <= 1e-7
  g_hard = jax.grad(mem.contrastive_loss)(xj, state.centroids, yj, TAU, state.valid)
  g_soft = jax.grad(mem.soft_contrastive_loss)(xj, state.centroids, targets, TAU, state.valid)
  np.testing.assert_allclose(np.asarray(g_soft), np.asarray(g_hard), rtol=1e-6, atol=1e-9)


def test_soft_loss_matches_numpy():
  x, m, y = _problem(4, clusters=5)
  rng = np.random.default_rng(5)
  t = rng.uniform(size=(len(y), 5))
  t /= t.sum(axis=1, keepdims=True)
  f = _unit(x)
  z = f @ m.T / TAU
  logp = z - z.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  ref = np.mean(-np.sum(t * logp, axis=1))
  got = mem.soft_contrastive_loss(
    jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32), jnp.asarray(t, jnp.float32), TAU
  )
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def _label_orders():
  pk = np.repeat(np.arange(4), 3)  # PxK: 4 identities x 3 instances
  shuffled = np.random.default_rng(7).permutation(pk)
  repeated = np.array([2, 2, 0, 2, 1, 1, 2, 0, 0, 2, 3, 2])
  return {"pk": pk, "shuffled": shuffled, "repeated": repeated}


@pytest.mark.parametrize("order", ["pk", "shuffled", "repeated"])
@pytest.mark.parametrize("hard", [False, True])
def test_momentum_update_matches_python_loop(order, hard):
  y = _label_orders()[order]
  rng = np.random.default_rng(11)
  x = rng.normal(size=(len(y), 8)) * 2.0
  m = _unit(rng.normal(size=(6, 8)))  # cluster 4, 5 absent from the batch
  state = mem.init_memory(m, bucket=8)
  update = jax.jit(mem.momentum_update, static_argnames="hard")
  new = np.asarray(
    update(state.centroids, jnp.asarray(x, jnp.float32), jnp.asarray(y), 0.1, hard=hard)
  )
  ref = (_np_hard_update if hard else _np_sequential_update)(m, x, y, 0.1)
  np.testing.assert_allclose(new[:6], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new[4:6], m[4:6].astype(np.float32))  # absent: unchanged
  np.testing.assert_array_equal(new[6:], 0.0)  # padding: unchanged
  np.testing.assert_allclose(np.linalg.norm(new[:4], axis=1), 1.0, rtol=1e-6)


def test_sequential_update_is_not_a_single_average():
  """A repeated label must be updated once per occurrence, in batch order."""
  m = np.array([[1.0, 0.0, 0.0]])
  x = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  y = np.array([0, 0])
  new = np.asarray(
    mem.momentum_update(
      jnp.asarray(m, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(y), 0.1
    )
  )[0]
  ref = _np_sequential_update(m, x, y, 0.1)[0]
  np.testing.assert_allclose(new, ref, atol=1e-6)
  # The last sample dominates; order matters.
  assert new[2] > new[1] > new[0] > 0
  swapped = np.asarray(
    mem.momentum_update(
      jnp.asarray(m, jnp.float32), jnp.asarray(x[::-1], jnp.float32), jnp.asarray(y), 0.1
    )
  )[0]
  assert swapped[1] > swapped[2]


def test_hard_update_uses_lowest_cosine_sample():
  m = np.array([[1.0, 0.0], [0.0, 1.0]])
  # Cluster 0: the sample at 80 degrees is the hardest (second in the batch); cluster 1:
  # the un-normalised [1.2, 1.6] (cosine 0.8 once normalised) is the hardest, in the middle.
  angles = np.deg2rad([10.0, 80.0, 30.0])
  x0 = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  x = np.concatenate([x0, [[0.1, 0.99]], [[1.2, 1.6]], [[0.3, 0.95]]], axis=0)
  y = np.array([0, 0, 0, 1, 1, 1])
  new = np.asarray(
    mem.momentum_update(
      jnp.asarray(m, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(y), 0.1, hard=True
    )
  )
  exp0 = 0.1 * m[0] + 0.9 * x0[1]
  np.testing.assert_allclose(new[0], exp0 / np.linalg.norm(exp0), atol=1e-6)
  exp1 = 0.1 * m[1] + 0.9 * np.array([0.6, 0.8])
  np.testing.assert_allclose(new[1], exp1 / np.linalg.norm(exp1), atol=1e-6)


def test_hard_update_tie_picks_first_in_batch_order():
  m = np.array([[1.0, 0.0, 0.0]])
  # Both samples have cosine 0 to the memory row but point in different directions.
  x = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  new = np.asarray(
    mem.momentum_update(
      jnp.asarray(m, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray([0, 0]), 0.1, hard=True
    )
  )[0]
  exp = 0.1 * m[0] + 0.9 * x[0]
  np.testing.assert_allclose(new, exp / np.linalg.norm(exp), atol=1e-6)


def test_bucket_size():
  assert mem.bucket_size(1) == 64
  assert mem.bucket_size(64) == 64
  assert mem.bucket_size(65) == 128
  assert mem.bucket_size(700) == 1024
  assert mem.bucket_size(3, minimum=2) == 4
  with pytest.raises(ValueError):
    mem.init_memory(np.zeros((10, 4)), bucket=8)


def test_changing_cluster_count_within_bucket_does_not_retrace():
  traces = []

  @jax.jit
  def step(state, feats, labels):
    traces.append(1)  # runs only while tracing
    loss = mem.contrastive_loss(feats, state.centroids, labels, TAU, state.valid)
    new = mem.momentum_update(state.centroids, feats, labels, 0.1)
    return loss, state.replace(centroids=new)

  rng = np.random.default_rng(3)
  feats = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  labels = jnp.asarray(np.arange(8) % 5)
  for num in (10, 23, 5, 64):
    state = mem.init_memory(_unit(rng.normal(size=(num, 4))))
    assert state.centroids.shape == (64, 4)
    loss, new_state = step(state, feats, labels)
    assert np.isfinite(float(loss))
    assert int(new_state.num_clusters) == num
    np.testing.assert_array_equal(np.asarray(new_state.centroids[num:]), 0.0)
  assert len(traces) == 1
  state = mem.init_memory(_unit(rng.normal(size=(65, 4))))  # next bucket: one new trace
  step(state, feats, labels)
  assert len(traces) == 2
