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


def torch_bank(features, labels, cams):
  feats = torch.tensor(features)
  rows, pids, cids = [], [], []
  for pid in sorted(np.unique(labels[labels >= 0]).tolist()):
    members = np.flatnonzero(labels == pid)
    for cid in sorted(np.unique(cams[members]).tolist()):
      rows.append(feats[members[cams[members] == cid]].mean(0))
      pids.append(pid)
      cids.append(cid)
  bank = torch.nn.functional.normalize(torch.stack(rows), dim=1)
  return bank, torch.tensor(pids), torch.tensor(cids)


def torch_loss(bank, pids, cids, inputs, targets, cams, num_hards):
  batch = inputs.shape[0]
  sims = torch.nn.functional.normalize(inputs, dim=1) @ bank.t() / TEMPERATURE
  detached = sims.detach().clone()
  loss = torch.zeros(())
  for i in range(batch):
    positive = (pids == targets[i]) & (cids != cams[i])
    negative = (pids != targets[i]).float()
    pos_idx = torch.nonzero(positive).squeeze(-1)
    if len(pos_idx) == 0:
      continue
    order = torch.sort(detached[i] - 9999999.0 * (1.0 - negative), descending=True).indices
    chosen = sims[i, torch.cat([pos_idx, order[:num_hards]])]
    target = torch.zeros(len(chosen))
    target[:len(pos_idx)] = 1.0 / len(pos_idx)
    loss = loss - (target * torch.log_softmax(chosen, dim=0)).sum()
  return loss / batch


def torch_update(bank, pids, cids, inputs, targets, cams, momentum):
  with torch.no_grad():
    for x, y, c in zip(torch.nn.functional.normalize(inputs, dim=1), targets, cams):
      row = torch.nonzero((pids == y) & (cids == c)).squeeze(-1)[0]
      bank[row] = momentum * bank[row] + (1.0 - momentum) * x
      bank[row] /= bank[row].norm()


@jax.jit
def _update(state, features, labels, cams):
  return cm.camera_proxy_update(state, features, labels, cams, MOMENTUM)


def _problem(rng, num_clusters, num_cams, dim, per_cluster):
  """Clusters spread over cameras; a few live in one camera only (samples without positives)."""
  centres = rng.normal(size=(num_clusters, dim))
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  cams = rng.integers(0, num_cams, size=labels.size)
  cams[labels < 2] = 1
  features = centres[labels] + 0.7 * rng.normal(size=(labels.size, dim))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  outliers = rng.random(labels.size) < 0.1
  labels[outliers] = -1
  return features.astype(np.float32), labels, cams


@pytest.mark.parametrize("num_hards", [5, 50])
def test_bank_loss_grad_and_update_match_torch(num_hards):
  rng = np.random.default_rng(11 + num_hards)
  features, labels, cams = _problem(rng, num_clusters=30, num_cams=4, dim=32, per_cluster=6)
  bank, pids, cids = torch_bank(features, labels, cams)
  # The reference's list is only well defined with >= num_hards proxies of other clusters.
  assert len(pids) - np.bincount(pids.numpy()).max() >= num_hards
  state, _ = cm.build_camera_proxies(features, labels, cams, bucket=256)
  num = len(pids)
  np.testing.assert_allclose(np.asarray(state.proxies)[:num], bank.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.cluster_ids)[:num], pids.numpy())
  np.testing.assert_array_equal(np.asarray(state.cam_ids)[:num], cids.numpy())

  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda f, s, y, c: cm.camera_proxy_loss(f, s, y, c, temperature=TEMPERATURE,
                                              num_hard_negatives=num_hards)))
  clustered = np.flatnonzero(labels >= 0)
  for step in range(3):
    idx = rng.choice(clustered, 16, replace=False)
    idx[0] = clustered[0]  # a sample of cluster 0, seen in camera 1 only: no positive
    batch = ((features[idx] + 0.3 * rng.normal(size=(16, 32)))
             * rng.uniform(0.5, 3.0, size=(16, 1))).astype(np.float32)
    inputs = torch.tensor(batch, requires_grad=True)
    targets, batch_cams = torch.tensor(labels[idx]), torch.tensor(cams[idx])
    ref = torch_loss(bank, pids, cids, inputs, targets, batch_cams, num_hards)
    ref.backward()
    loss, grad = loss_and_grad(jnp.asarray(batch), state, jnp.asarray(labels[idx]),
                               jnp.asarray(cams[idx]))
    assert float(loss) == pytest.approx(ref.item(), rel=1e-5)
    ref_grad = inputs.grad.numpy()
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_grad).max())
    # The optional CAP/O2CAP update, on both sides, so the next step's bank differs.
    torch_update(bank, pids, cids, inputs.detach(), targets, batch_cams, MOMENTUM)
    state = _update(state, jnp.asarray(batch), jnp.asarray(labels[idx]), jnp.asarray(cams[idx]))
    got = np.asarray(state.proxies)
    np.testing.assert_allclose(got[:num], bank.numpy(), rtol=0, atol=1e-6, err_msg=f"step {step}")
    assert not got[num:].any()
