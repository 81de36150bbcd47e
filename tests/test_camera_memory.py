"""Camera-aware proxies against numpy: the bank, the inter-camera loss, its gradient, the update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import camera_memory as cm
from ccreid_jax import memory as memory_lib

TAU = 0.07


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _np_proxies(x, labels, cameras):
  """Loops in the reference's order: sorted clusters, then the sorted cameras of each."""
  rows, proxy_clusters, proxy_cameras = [], [], []
  for k in sorted(set(labels[labels >= 0].tolist())):
    for c in sorted(set(cameras[labels == k].tolist())):
      rows.append(x[(labels == k) & (cameras == c)].astype(np.float64).mean(axis=0))
      proxy_clusters.append(k)
      proxy_cameras.append(c)
  return _unit(np.array(rows)), np.array(proxy_clusters), np.array(proxy_cameras)


def _np_loss_and_grad(x, proxies, proxy_clusters, proxy_cameras, labels, cameras, tau, k):
  """Float64 per-sample loop of the formulation and its hand-derived gradient w.r.t. ``x``."""
  x = x.astype(np.float64)
  batch = x.shape[0]
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  f = x / norm
  s = f @ proxies.T / tau
  total, g_s = 0.0, np.zeros_like(s)
  for i in range(batch):
    pos = np.flatnonzero((proxy_clusters == labels[i]) & (proxy_cameras != cameras[i]))
    if pos.size == 0:
      continue
    neg = np.flatnonzero(proxy_clusters != labels[i])
    hard = neg[np.argsort(-s[i, neg], kind="stable")[:k]]
    chosen = np.concatenate([pos, hard])
    z = s[i, chosen] - s[i, chosen].max()
    q = np.exp(z) / np.exp(z).sum()
    t = np.zeros(chosen.size)
    t[: pos.size] = 1.0 / pos.size
    total -= np.sum(t * np.log(q))
    g_s[i, chosen] = (q - t) / batch
  g_f = g_s @ proxies / tau
  g_x = (g_f - np.sum(g_f * f, axis=1, keepdims=True) * f) / norm
  return total / batch, g_x


def _problem(seed, num=60, dim=16, clusters=7, camera_values=(0, 2, 5), batch=12):
  """Train features with outliers and cameras; a batch of clustered samples."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(num, dim)) * rng.uniform(0.5, 3.0, size=(num, 1))).astype(np.float32)
  labels = rng.integers(-1, clusters, size=num)
  cameras = rng.choice(np.array(camera_values), size=num)
  batch_idx = rng.choice(np.flatnonzero(labels >= 0), batch, replace=False)
  feats = (x[batch_idx] + 0.3 * rng.normal(size=(batch, dim))).astype(np.float32)
  return x, labels, cameras, feats, labels[batch_idx], cameras[batch_idx]


_loss_and_grad = jax.jit(
  jax.value_and_grad(cm.camera_proxy_loss), static_argnames=("temperature", "num_hard_negatives")
)


def _jax_loss_and_grad(feats, state, labels, cameras, k, tau=TAU):
  loss, grad = _loss_and_grad(
    jnp.asarray(feats),
    state,
    jnp.asarray(labels),
    jnp.asarray(cameras),
    temperature=tau,
    num_hard_negatives=k,
  )
  return float(loss), np.asarray(grad)


def test_build_matches_reference_loops():
  x, labels, cameras, *_ = _problem(0)
  state, sample_proxy = cm.build_camera_proxies(x, labels, cameras)
  proxies, proxy_clusters, proxy_cameras = _np_proxies(x, labels, cameras)
  num = len(proxy_clusters)
  assert state.bucket == memory_lib.bucket_size(num, cm.DEFAULT_MIN_BUCKET) == 256
  assert int(state.num_proxies) == num
  np.testing.assert_allclose(np.asarray(state.proxies)[:num], proxies, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.cluster_ids)[:num], proxy_clusters)
  np.testing.assert_array_equal(np.asarray(state.cameras)[:num], proxy_cameras)
  assert not np.asarray(state.proxies)[num:].any()
  assert (np.asarray(state.cluster_ids)[num:] == -1).all()
  np.testing.assert_array_equal(np.asarray(state.valid), np.arange(256) < num)
  # Every clustered sample points at the proxy of its own (cluster, camera); outliers at -1.
  kept = labels >= 0
  assert (sample_proxy[~kept] == -1).all()
  np.testing.assert_array_equal(proxy_clusters[sample_proxy[kept]], labels[kept])
  np.testing.assert_array_equal(proxy_cameras[sample_proxy[kept]], cameras[kept])


def test_build_buckets_empty_bank_and_errors():
  x, labels, cameras, *_ = _problem(1)
  num = int(cm.build_camera_proxies(x, labels, cameras)[0].num_proxies)
  assert cm.build_camera_proxies(x, labels, cameras, min_bucket=4)[0].bucket == (
    memory_lib.bucket_size(num, 4)
  )
  assert cm.build_camera_proxies(x, labels, cameras, bucket=num)[0].bucket == num
  with pytest.raises(ValueError, match="bucket 3 is smaller than the number of camera proxies"):
    cm.build_camera_proxies(x, labels, cameras, bucket=3)
  with pytest.raises(ValueError, match="must both be"):
    cm.build_camera_proxies(x, labels[:-1], cameras)
  with pytest.raises(ValueError, match="cameras must be integers"):
    cm.build_camera_proxies(x, labels, cameras.astype(np.float32))
  empty, sample_proxy = cm.build_camera_proxies(x, np.full(len(x), -1), cameras, bucket=8)
  assert empty.proxies.shape == (8, x.shape[1]) and not np.asarray(empty.valid).any()
  assert (sample_proxy == -1).all()
  # No sample at all: the placeholder bank of a train state before its first clustering.
  none, _ = cm.build_camera_proxies(
    np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, int), bucket=1
  )
  assert none.proxies.shape == (1, 4) and not np.asarray(none.valid).any()
  loss = cm.camera_proxy_loss(
    jnp.ones((2, 4)),
    none,
    jnp.zeros(2, int),
    jnp.zeros(2, int),
    temperature=TAU,
    num_hard_negatives=50,
  )
  assert float(loss) == 0.0


@pytest.mark.parametrize("k", [0, 3, 50], ids=["no_negatives", "k3", "all_negatives"])
def test_loss_and_grad_match_numpy(k):
  x, labels, cameras, feats, y, c = _problem(2)
  state, _ = cm.build_camera_proxies(x, labels, cameras)
  proxies, proxy_clusters, proxy_cameras = _np_proxies(x, labels, cameras)
  ref_loss, ref_grad = _np_loss_and_grad(
    feats, proxies, proxy_clusters, proxy_cameras, y, c, TAU, k
  )
  loss, grad = _jax_loss_and_grad(feats, state, y, c, k)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-5 * np.abs(ref_grad).max())


def test_hard_negatives_are_the_k_most_similar_other_cluster_proxies():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 40)).astype(np.float32)
  negative = rng.random((6, 40)) < 0.5
  for k in (1, 4, 30):  # 30: more than any row's number of negatives
    mask = np.asarray(cm._hard_negative_mask(jnp.asarray(logits), jnp.asarray(negative), k))
    for i in range(6):
      neg = np.flatnonzero(negative[i])
      want = neg[np.argsort(-logits[i, neg])[:k]]
      np.testing.assert_array_equal(np.flatnonzero(mask[i]), np.sort(want))


def test_own_camera_and_single_camera_clusters():
  """A cluster seen in one camera gives its samples no positive: they add 0 but count in B."""
  dim = 8
  rng = np.random.default_rng(4)
  x = rng.normal(size=(9, dim)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  cameras = np.array([0, 0, 1, 3, 3, 0, 1, 2, 2])  # cluster 1 only in camera 3
  state, _ = cm.build_camera_proxies(x, labels, cameras, bucket=8)
  lonely = rng.normal(size=(3, dim)).astype(np.float32)
  loss, grad = _jax_loss_and_grad(lonely, state, np.ones(3, int), np.full(3, 3), 5)
  assert loss == 0.0 and not grad.any()
  # Mixed batch: the sum of the others' losses divided by the full batch size.
  feats = rng.normal(size=(4, dim)).astype(np.float32)
  y, c = np.array([0, 1, 2, 0]), np.array([0, 3, 2, 1])
  proxies, proxy_clusters, proxy_cameras = _np_proxies(x, labels, cameras)
  ref_loss, _ = _np_loss_and_grad(feats, proxies, proxy_clusters, proxy_cameras, y, c, TAU, 5)
  loss, grad = _jax_loss_and_grad(feats, state, y, c, 5)
  assert loss == pytest.approx(ref_loss, rel=1e-5) and ref_loss > 0
  assert not grad[1].any() and grad[0].any()
  # The own-camera proxy of the own cluster is not a positive: moving it changes nothing.
  own = int(np.flatnonzero((proxy_clusters == 0) & (proxy_cameras == 0))[0])
  moved = state.replace(proxies=state.proxies.at[own].set(-state.proxies[own]))
  single = _jax_loss_and_grad(feats[:1], state, y[:1], c[:1], 5)[0]
  assert _jax_loss_and_grad(feats[:1], moved, y[:1], c[:1], 5)[0] == single


def test_bucket_does_not_change_loss_or_grad():
  x, labels, cameras, feats, y, c = _problem(5)
  num = int(cm.build_camera_proxies(x, labels, cameras)[0].num_proxies)
  banks = [cm.build_camera_proxies(x, labels, cameras, bucket=b)[0] for b in (num, 2 * num, 256)]
  results = [_jax_loss_and_grad(feats, bank, y, c, 4) for bank in banks]
  for loss, grad in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-6)
    np.testing.assert_allclose(grad, results[0][1], rtol=1e-6, atol=1e-7)


def _np_update(proxies, proxy_clusters, proxy_cameras, x, labels, cameras, mu):
  out = proxies.astype(np.float64).copy()
  for xi, yi, ci in zip(_unit(x.astype(np.float64)), labels, cameras):
    row = np.flatnonzero((proxy_clusters == yi) & (proxy_cameras == ci))
    if row.size:
      out[row[0]] = mu * out[row[0]] + (1 - mu) * xi
      out[row[0]] /= np.linalg.norm(out[row[0]])
  return out


def test_update_sequential_matches_numpy():
  x, labels, cameras, feats, y, c = _problem(6)
  state, _ = cm.build_camera_proxies(x, labels, cameras, bucket=64)
  proxies, proxy_clusters, proxy_cameras = _np_proxies(x, labels, cameras)
  num = len(proxy_clusters)
  # Repeated pairs (sequential order matters) and one pair that has no proxy (camera 7).
  y = np.concatenate([y, y[:3], [y[0]]])
  c = np.concatenate([c, c[:3], [7]])
  feats = np.concatenate([feats, feats[:3] * 2.0 + 0.1, feats[:1]]).astype(np.float32)
  update = jax.jit(cm.camera_proxy_update, static_argnames="momentum")
  new = update(state, jnp.asarray(feats), jnp.asarray(y), jnp.asarray(c), momentum=0.2)
  want = _np_update(proxies, proxy_clusters, proxy_cameras, feats, y, c, 0.2)
  got = np.asarray(new.proxies)
  np.testing.assert_allclose(got[:num], want, rtol=0, atol=1e-6)
  assert not got[num:].any(), "padding rows must stay untouched"
  for field in ("cluster_ids", "cameras", "valid"):
    np.testing.assert_array_equal(
      np.asarray(getattr(new, field)), np.asarray(getattr(state, field))
    )
  assert (
    cm.camera_proxy_update(state, jnp.asarray(feats), jnp.asarray(y), jnp.asarray(c), momentum=1.0)
    is state
  )


def test_own_proxy_index():
  x, labels, cameras, *_ = _problem(7)
  state, sample_proxy = cm.build_camera_proxies(x, labels, cameras, bucket=64)
  kept = np.flatnonzero(labels >= 0)
  got = np.asarray(cm.own_proxy_index(state, jnp.asarray(labels[kept]), jnp.asarray(cameras[kept])))
  np.testing.assert_array_equal(got, sample_proxy[kept])
  assert int(cm.own_proxy_index(state, jnp.array([0]), jnp.array([99]))[0]) == 64
