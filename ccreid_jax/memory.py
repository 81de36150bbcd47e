"""Cluster memory: contrastive loss against centroids and their momentum update.

The memory ``M`` (C x D, unit rows) is rebuilt every epoch from the cluster centroids.
The number of clusters changes every epoch, so ``M`` is padded to a bucketed size
(:func:`bucket_size`) and a ``valid`` mask keeps the padding out of the softmax; a jitted
train step is compiled once per bucket, not once per epoch.

Everything here is a pure function of arrays and works under ``jax.jit``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ccreid_jax.ops import l2_normalize  # the model's own too: one definition

# Logit given to padded memory rows: exp(_MASKED - max_logit) underflows to exactly 0
# (real logits are bounded by 1 / temperature), and it stays finite so 0 * logit is 0.
_MASKED = -1e9
_NORM_EPS = 1e-12


@flax.struct.dataclass
class MemoryState:
  """Padded memory: ``centroids`` (Cpad, D) float32, ``valid`` (Cpad,) bool.

  Rows ``valid == False`` are padding: they receive no probability in the losses and the
  update never touches them (labels only point at real clusters).
  """

  centroids: jax.Array
  valid: jax.Array

  @property
  def num_clusters(self) -> jax.Array:
    """Number of real (unpadded) clusters, an int32 scalar (works inside jit)."""
    return jnp.sum(self.valid, dtype=jnp.int32)

  @property
  def bucket(self) -> int:
    return self.centroids.shape[0]


def bucket_size(num_clusters: int, minimum: int = 64) -> int:
  """Smallest power of two >= max(num_clusters, minimum)."""
  n = max(int(num_clusters), int(minimum), 1)
  return 1 << (n - 1).bit_length()


def init_memory(centroids: np.ndarray, bucket: int | None = None) -> MemoryState:
  """Pads (C, D) centroids with zero rows to ``bucket`` rows (default: bucket_size(C)).

  The centroids are stored as given (the caller L2-normalises the cluster means).
  """
  centroids = np.asarray(centroids, dtype=np.float32)
  if centroids.ndim != 2:
    raise ValueError(f"centroids must be (C, D), got shape {centroids.shape}")
  num, dim = centroids.shape
  if bucket is None:
    bucket = bucket_size(num)
  if bucket < num:
    raise ValueError(f"bucket {bucket} is smaller than the number of clusters {num}")
  padded = np.zeros((bucket, dim), np.float32)
  padded[:num] = centroids
  valid = np.arange(bucket) < num
  return MemoryState(centroids=jnp.asarray(padded), valid=jnp.asarray(valid))


def memory_logits(features: jax.Array, centroids: jax.Array, temperature: float,
                  valid: jax.Array | None = None) -> jax.Array:
  """(B, C) float32 logits ``l2norm(features) @ centroids.T / temperature``.

  The centroids get no gradient; padded rows (``valid == False``) get a large negative
  logit. The product runs at full float32 precision (no TF32 / bf16 passes).
  """
  f = l2_normalize(features)
  m = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  logits = jnp.matmul(f, m.T, precision=jax.lax.Precision.HIGHEST) / temperature
  if valid is not None:
    logits = jnp.where(valid[None, :], logits, _MASKED)
  return logits


def contrastive_loss(features: jax.Array, centroids: jax.Array, labels: jax.Array,
                     temperature: float, valid: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy of the memory logits against integer cluster labels (B,)."""
  logits = memory_logits(features, centroids, temperature, valid)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def soft_contrastive_loss(features: jax.Array, centroids: jax.Array, targets: jax.Array,
                          temperature: float, valid: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of ``-sum_c targets[b, c] * log_softmax(logits)[b, c]``.

  ``targets`` (B, C) are distributions over the (padded) memory rows; with one-hot
  targets this equals :func:`contrastive_loss`.
  """
  logits = memory_logits(features, centroids, temperature, valid)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = jax.lax.stop_gradient(targets).astype(jnp.float32)
  per_sample = -jnp.sum(jnp.where(targets != 0, targets * log_probs, 0.0), axis=-1)
  return jnp.mean(per_sample)


def momentum_update(centroids: jax.Array, features: jax.Array, labels: jax.Array,
                    momentum: float, hard: bool = False) -> jax.Array:
  """Returns the memory after this batch's update (features are L2-normalised first).

  ``hard=False``: sequential in batch order, ``M[y] <- l2norm(mu * M[y] + (1 - mu) * x)``
  for every sample; a label seen k times is updated k times, in order (a scan, since the
  renormalisation after each sample makes this non-linear).

  ``hard=True``: once per cluster present in the batch, with the in-batch sample of
  lowest cosine to the memory row before the update (ties: the first in batch order).
  Rows of clusters absent from the batch, including padding, are returned unchanged.
  """
  memory = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  x = l2_normalize(jax.lax.stop_gradient(features))
  labels = labels.astype(jnp.int32)
  if hard:
    return _hard_update(memory, x, labels, momentum)

  def step(mem, sample):
    feature, label = sample
    row = momentum * mem[label] + (1.0 - momentum) * feature
    row = row / jnp.maximum(jnp.linalg.norm(row), _NORM_EPS)
    return mem.at[label].set(row), None

  memory, _ = jax.lax.scan(step, memory, (x, labels))
  return memory


def _hard_update(memory: jax.Array, x: jax.Array, labels: jax.Array,
                 momentum: float) -> jax.Array:
  num_rows = memory.shape[0]
  batch = x.shape[0]
  # Elementwise products, so the cosines are exact float32 (no matmul precision mode).
  cosine = jnp.sum(x * memory[labels], axis=-1)                               # (B,)
  lowest = jax.ops.segment_min(cosine, labels, num_segments=num_rows)          # (C,)
  is_lowest = cosine == lowest[labels]
  candidate = jnp.where(is_lowest, jnp.arange(batch, dtype=jnp.int32), batch)
  hardest = jax.ops.segment_min(candidate, labels, num_segments=num_rows)     # (C,)
  present = hardest < batch
  chosen = x[jnp.clip(hardest, 0, batch - 1)]                                  # (C, D)
  updated = l2_normalize(momentum * memory + (1.0 - momentum) * chosen)
  return jnp.where(present[:, None], updated, memory)
