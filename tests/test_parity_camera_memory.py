"""Camera-aware proxies vs a PyTorch reference: the proxy bank, the loss, its gradient, the update.

The torch side is PPLR's design written from docs/algorithms.md section 12: the bank built in
loops over sorted clusters and their sorted cameras (mean, then normalise); the loss as a loop
over the batch that gathers each sample's other-camera positives and its hardest negatives by a
descending sort of the detached similarities with non-negatives pushed down by a large
constant, a soft target 1/|positives|, samples without positives skipped and the sum divided by
the batch size; the optional update as CAP's in-place sequential momentum rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import camera_memory as cm

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

TEMPERATURE = 0.07
MOMENTUM = 0.2


def torch_bank(features, labels, cameras):
  feats = torch.tensor(features)
  rows, proxy_clusters, proxy_cameras = [], [], []
  for cluster in sorted(np.unique(labels[labels >= 0]).tolist()):
    members = np.flatnonzero(labels == cluster)
    for camera in sorted(np.unique(cameras[members]).tolist()):
      rows.append(feats[members[cameras[members] == camera]].mean(0))
      proxy_clusters.append(cluster)
      proxy_cameras.append(camera)
  bank = torch.nn.functional.normalize(torch.stack(rows), dim=1)
  return bank, torch.tensor(proxy_clusters), torch.tensor(proxy_cameras)


def torch_loss(bank, proxy_clusters, proxy_cameras, inputs, targets, cameras, num_hards):
  batch = inputs.shape[0]
  sims = torch.nn.functional.normalize(inputs, dim=1) @ bank.t() / TEMPERATURE
  detached = sims.detach().clone()
  loss = torch.zeros(())
  for i in range(batch):
    positive = (proxy_clusters == targets[i]) & (proxy_cameras != cameras[i])
    negative = (proxy_clusters != targets[i]).float()
    pos_idx = torch.nonzero(positive).squeeze(-1)
    if len(pos_idx) == 0:
      continue
    order = torch.sort(detached[i] - 9999999.0 * (1.0 - negative), descending=True).indices
    chosen = sims[i, torch.cat([pos_idx, order[:num_hards]])]
    target = torch.zeros(len(chosen))
    target[: len(pos_idx)] = 1.0 / len(pos_idx)
    loss = loss - (target * torch.log_softmax(chosen, dim=0)).sum()
  return loss / batch


def torch_update(bank, proxy_clusters, proxy_cameras, inputs, targets, cameras, momentum):
  with torch.no_grad():
    for x, y, c in zip(torch.nn.functional.normalize(inputs, dim=1), targets, cameras):
      row = torch.nonzero((proxy_clusters == y) & (proxy_cameras == c)).squeeze(-1)[0]
      bank[row] = momentum * bank[row] + (1.0 - momentum) * x
      bank[row] /= bank[row].norm()


@jax.jit
def _update(state, features, labels, cameras):
  return cm.camera_proxy_update(state, features, labels, cameras, MOMENTUM)


def _problem(rng, num_clusters, num_cameras, dim, per_cluster):
  """Clusters spread over cameras; a few live in one camera only (samples without positives)."""
  centres = rng.normal(size=(num_clusters, dim))
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  cameras = rng.integers(0, num_cameras, size=labels.size)
  cameras[labels < 2] = 1
  features = centres[labels] + 0.7 * rng.normal(size=(labels.size, dim))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  outliers = rng.random(labels.size) < 0.1
  labels[outliers] = -1
  return features.astype(np.float32), labels, cameras


@pytest.mark.parametrize("num_hards", [5, 50])
def test_bank_loss_grad_and_update_match_torch(num_hards):
  rng = np.random.default_rng(11 + num_hards)
  features, labels, cameras = _problem(rng, num_clusters=30, num_cameras=4, dim=32, per_cluster=6)
  bank, proxy_clusters, proxy_cameras = torch_bank(features, labels, cameras)
  # The reference's list is only well defined with >= num_hards proxies of other clusters.
  assert len(proxy_clusters) - np.bincount(proxy_clusters.numpy()).max() >= num_hards
  state, _ = cm.build_camera_proxies(features, labels, cameras, bucket=256)
  num = len(proxy_clusters)
  np.testing.assert_allclose(np.asarray(state.proxies)[:num], bank.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.cluster_ids)[:num], proxy_clusters.numpy())
  np.testing.assert_array_equal(np.asarray(state.cameras)[:num], proxy_cameras.numpy())

  loss_and_grad = jax.jit(
    jax.value_and_grad(
      lambda f, s, y, c: cm.camera_proxy_loss(
        f, s, y, c, temperature=TEMPERATURE, num_hard_negatives=num_hards
      )
    )
  )
  clustered = np.flatnonzero(labels >= 0)
  for step in range(3):
    idx = rng.choice(clustered, 16, replace=False)
    idx[0] = clustered[0]  # a sample of cluster 0, seen in camera 1 only: no positive
    batch = (
      (features[idx] + 0.3 * rng.normal(size=(16, 32))) * rng.uniform(0.5, 3.0, size=(16, 1))
    ).astype(np.float32)
    inputs = torch.tensor(batch, requires_grad=True)
    targets, batch_cameras = torch.tensor(labels[idx]), torch.tensor(cameras[idx])
    ref = torch_loss(bank, proxy_clusters, proxy_cameras, inputs, targets, batch_cameras, num_hards)
    ref.backward()
    loss, grad = loss_and_grad(
      jnp.asarray(batch), state, jnp.asarray(labels[idx]), jnp.asarray(cameras[idx])
    )
    assert float(loss) == pytest.approx(ref.item(), rel=1e-5)
    ref_grad = inputs.grad.numpy()
    np.testing.assert_allclose(
      np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-5 * np.abs(ref_grad).max()
    )
    # The optional CAP/O2CAP update, on both sides, so the next step's bank differs.
    torch_update(
      bank, proxy_clusters, proxy_cameras, inputs.detach(), targets, batch_cameras, MOMENTUM
    )
    state = _update(state, jnp.asarray(batch), jnp.asarray(labels[idx]), jnp.asarray(cameras[idx]))
    got = np.asarray(state.proxies)
    np.testing.assert_allclose(got[:num], bank.numpy(), rtol=0, atol=1e-6, err_msg=f"step {step}")
    assert not got[num:].any()
