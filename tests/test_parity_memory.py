"""Cluster memory vs a PyTorch reference: loss, its gradient, and 3 steps of momentum updates.

The torch side is the reference's design written from docs/algorithms.md section 4: an autograd
Function whose forward is ``inputs @ M^T`` and whose backward returns ``grad @ M`` with the
memory *before* the update, then updates ``M`` in place, sample by sample (or once per
cluster with the least similar sample, the hard variant).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import memory as memory_lib

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

TEMPERATURE = 0.05
MOMENTUM = 0.1


class _MemoryProduct(torch.autograd.Function):
  """Logits against the memory; the backward pass updates the memory in place."""

  @staticmethod
  def forward(ctx, inputs, targets, memory, momentum, hard):
    ctx.memory, ctx.momentum, ctx.hard = memory, momentum, hard
    ctx.save_for_backward(inputs, targets)
    return inputs.mm(memory.t())

  @staticmethod
  def backward(ctx, grad_outputs):
    inputs, targets = ctx.saved_tensors
    memory, mu = ctx.memory, ctx.momentum
    grad_inputs = grad_outputs.mm(memory) if ctx.needs_input_grad[0] else None
    if not ctx.hard:
      for x, y in zip(inputs, targets.tolist()):
        memory[y] = mu * memory[y] + (1.0 - mu) * x
        memory[y] /= memory[y].norm()
    else:
      members = {}
      for x, y in zip(inputs, targets.tolist()):
        members.setdefault(y, []).append(x)
      for y, xs in members.items():
        cosines = [float(x.dot(memory[y])) for x in xs]
        hardest = xs[int(np.argmin(cosines))]
        memory[y] = memory[y] * mu + (1.0 - mu) * hardest
        memory[y] /= memory[y].norm()
    return grad_inputs, None, None, None, None


def torch_step(memory, features, labels, momentum, hard):
  """One reference step: returns (loss, d loss / d features); ``memory`` is updated."""
  inputs = torch.tensor(features, requires_grad=True)
  targets = torch.tensor(labels, dtype=torch.long)
  normed = torch.nn.functional.normalize(inputs, dim=1)
  logits = _MemoryProduct.apply(normed, targets, memory, momentum, hard)
  logits = logits / TEMPERATURE
  loss = torch.nn.functional.cross_entropy(logits, targets)
  loss.backward()
  return loss.item(), inputs.grad.numpy()


@jax.jit
def _loss_and_grad(features, centroids, labels, valid):
  return jax.value_and_grad(memory_lib.contrastive_loss)(
    features, centroids, labels, TEMPERATURE, valid
  )


def jax_step(state, features, labels, momentum, hard):
  loss, grad = _loss_and_grad(
    jnp.asarray(features), state.centroids, jnp.asarray(labels), state.valid
  )
  centroids = memory_lib.momentum_update(
    state.centroids, jnp.asarray(features), jnp.asarray(labels), momentum, hard=hard
  )
  return float(loss), np.asarray(grad), state.replace(centroids=centroids)


def pk_labels(rng, num_clusters, p, k, shuffle):
  ids = rng.choice(num_clusters, p, replace=False)
  labels = np.repeat(ids, k)
  return rng.permutation(labels) if shuffle else labels


@pytest.mark.parametrize("hard", [False, True], ids=["sequential", "hard"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["pk_order", "shuffled"])
def test_loss_grad_and_memory_match_torch(hard, shuffle):
  rng = np.random.default_rng(7 + 2 * hard + shuffle)
  num_clusters, dim, p, k = 12, 32, 4, 4
  centroids = rng.normal(size=(num_clusters, dim)).astype(np.float32)
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  # Torch keeps the unpadded memory; ours is padded to a bucket of 16 with a valid mask.
  ref_memory = torch.tensor(centroids)
  state = memory_lib.init_memory(centroids, bucket=16)
  for _ in range(3):
    labels = pk_labels(rng, num_clusters, p, k, shuffle)
    # Un-normalised features near their cluster's centroid, various norms.
    features = (centroids[labels] + 0.6 * rng.normal(size=(p * k, dim))) * rng.uniform(
      0.5, 3.0, size=(p * k, 1)
    )
    features = features.astype(np.float32)
    ref_loss, ref_grad = torch_step(ref_memory, features, labels, MOMENTUM, hard)
    loss, grad, state = jax_step(state, features, labels, MOMENTUM, hard)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)
    got = np.asarray(state.centroids)
    np.testing.assert_allclose(got[:num_clusters], ref_memory.numpy(), rtol=0, atol=1e-6)
    assert not got[num_clusters:].any(), "the padding rows must stay untouched"
