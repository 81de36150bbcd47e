"""Cluster memory: contrastive loss against centroids and their rewriting after each step.

The memory ``M`` (C x D, unit rows) is rebuilt every epoch from the cluster centroids.
The number of clusters changes every epoch, so ``M`` is padded to a bucketed size
(:func:`bucket_size`) and a ``valid`` mask keeps the padding out of the softmax; a jitted
train step is compiled once per bucket, not once per epoch.

After each step the rows are rewritten with the step's features: Cluster Contrast's momentum
update (:func:`momentum_update`, sequential or hard) or BMW's pull-and-push rewrite
(:func:`bmw_update`); :func:`update_centroids` picks one from ``config.memory.update_rule``.

Everything here is a pure function of arrays and works under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, overload

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ccreid_jax.ops import l2_normalize  # the model's own too: one definition

# Logit given to padded memory rows: exp(_MASKED - max_logit) underflows to exactly 0
# (real logits are bounded by 1 / temperature), and it stays finite so 0 * logit is 0.
_MASKED = -1e9
_NORM_EPS = 1e-12

# The values of ``config.memory.update_rule``: how the rows are rewritten after each step.
UPDATE_RULES: tuple[str, ...] = ("momentum", "hard", "bmw")


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


def memory_logits(
  features: jax.Array, centroids: jax.Array, temperature: float, valid: jax.Array | None = None
) -> jax.Array:
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


def contrastive_loss(
  features: jax.Array,
  centroids: jax.Array,
  labels: jax.Array,
  temperature: float,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Mean cross-entropy of the memory logits against integer cluster labels (B,)."""
  logits = memory_logits(features, centroids, temperature, valid)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def soft_contrastive_loss(
  features: jax.Array,
  centroids: jax.Array,
  targets: jax.Array,
  temperature: float,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Mean over the batch of ``-sum_c targets[b, c] * log_softmax(logits)[b, c]``.

  ``targets`` (B, C) are distributions over the (padded) memory rows; with one-hot
  targets this equals :func:`contrastive_loss`.
  """
  logits = memory_logits(features, centroids, temperature, valid)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = jax.lax.stop_gradient(targets).astype(jnp.float32)
  per_sample = -jnp.sum(jnp.where(targets != 0, targets * log_probs, 0.0), axis=-1)
  return jnp.mean(per_sample)


def momentum_update(
  centroids: jax.Array, features: jax.Array, labels: jax.Array, momentum: float, hard: bool = False
) -> jax.Array:
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


def _hard_update(memory: jax.Array, x: jax.Array, labels: jax.Array, momentum: float) -> jax.Array:
  num_rows = memory.shape[0]
  batch = x.shape[0]
  # Elementwise products, so the cosines are exact float32 (no matmul precision mode).
  cosine = jnp.sum(x * memory[labels], axis=-1)  # (B,)
  lowest = jax.ops.segment_min(cosine, labels, num_segments=num_rows)  # (C,)
  is_lowest = cosine == lowest[labels]
  candidate = jnp.where(is_lowest, jnp.arange(batch, dtype=jnp.int32), batch)
  hardest = jax.ops.segment_min(candidate, labels, num_segments=num_rows)  # (C,)
  present = hardest < batch
  chosen = x[jnp.clip(hardest, 0, batch - 1)]  # (C, D)
  updated = l2_normalize(momentum * memory + (1.0 - momentum) * chosen)
  return jnp.where(present[:, None], updated, memory)


def bmw_update(
  centroids: jax.Array,
  features: jax.Array,
  labels: jax.Array,
  *,
  pull: float = 0.9,
  push: float = 0.2,
  dynamic_weights: bool = True,
  valid: jax.Array | None = None,
) -> jax.Array:
  """BMW's rewrite of the memory after a step: pull each row in, push it from its neighbour.

  Liu et al., "Bidirectionally Memory bank reWriting for Unsupervised Person
  Re-Identification", NeurIPS 2025 (``liu-xb/BMW``, ``reid/gcctrain_v2_weight.py``, strategy
  ``far-update``; docs/algorithms.md section 13). The features are L2-normalised first.
  Every cluster present in the batch is rewritten once, one cluster at a time in the order of
  its first sample in the batch, so that a later cluster sees the rows rewritten before it.
  For cluster ``y`` with row ``m``:

  * ``f``: its hardest positive, the batch sample of ``y`` with the lowest cosine to ``m``
    (the first in batch order on ties);
  * ``c``: its nearest other row, the row of largest cosine to ``m`` with ``m``'s own
    cosine counted as 0 (as the authors do; so when every other cosine is negative, ``c`` is
    ``m`` itself) and padded rows (``valid == False``) never chosen;
  * ``g1 = (1 - <m, f>) (m - f)``, ``g2 = (1 + <m, c>) (m + c)`` (``dynamic_weights=False``:
    ``g1 = m - f``, ``g2 = m + c``);
  * ``m <- l2norm(m - pull * g1 - push * g2)``.

  Rows of clusters absent from the batch, and padding, are returned unchanged.

  Args:
    centroids: (K, D) float32 memory rows (unit norm; padded rows may be anything).
    features: (B, D) batch features (the ones the loss used; no gradient flows).
    labels: (B,) int cluster labels, each a real row of ``centroids``.
    pull: eta1, the weight of the pull towards the hardest positive.
    push: eta2, the weight of the push away from the nearest other row.
    dynamic_weights: scale the pull by ``1 - <m, f>`` and the push by ``1 + <m, c>``.
    valid: (K,) bool, the real rows; None: every row is real.

  Returns:
    The (K, D) float32 memory after the rewrite.
  """
  memory = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  x = l2_normalize(jax.lax.stop_gradient(features))
  labels = labels.astype(jnp.int32)
  batch = labels.shape[0]
  candidate = jnp.ones(memory.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
  # One scan slot per sample: first the first sample of each cluster in batch order (its
  # cluster is rewritten there), then the repeated samples, whose slots change nothing.
  position = jnp.arange(batch)
  seen_before = jnp.any(
    (labels[:, None] == labels[None, :]) & (position[None, :] < position[:, None]), axis=1
  )
  order = jnp.argsort(seen_before.astype(jnp.int32), stable=True)

  def rewrite(mem: jax.Array, slot: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    label, active = slot
    m = mem[label]
    # Elementwise products, so the cosines are exact float32 (no matmul precision mode).
    to_members = jnp.where(labels == label, jnp.sum(x * m, axis=-1), jnp.inf)  # (B,)
    hardest = jnp.argmin(to_members)  # ties: the first in batch order
    f, mf = x[hardest], to_members[hardest]
    to_rows = jnp.sum(mem * m, axis=-1)  # (K,)
    scores = jnp.where(candidate, to_rows, -jnp.inf).at[label].set(0.0)
    nearest = jnp.argmax(scores)  # ties: the lowest row index
    c, mc = mem[nearest], to_rows[nearest]  # mc = <m, m> when c is m itself
    g1, g2 = m - f, m + c
    if dynamic_weights:
      g1, g2 = (1.0 - mf) * g1, (1.0 + mc) * g2
    row = m - pull * g1 - push * g2
    row = row / jnp.maximum(jnp.linalg.norm(row), _NORM_EPS)
    return mem.at[label].set(jnp.where(active, row, m)), None

  memory, _ = jax.lax.scan(rewrite, memory, (labels[order], ~seen_before[order]))
  return memory


@overload
def update_centroids(
  memory: MemoryState, features: jax.Array, labels: jax.Array, settings: Any
) -> MemoryState: ...
@overload
def update_centroids(
  memory: jax.Array, features: jax.Array, labels: jax.Array, settings: Any
) -> jax.Array: ...
def update_centroids(
  memory: MemoryState | jax.Array, features: jax.Array, labels: jax.Array, settings: Any
) -> MemoryState | jax.Array:
  """The memory after this step's rewrite, as ``settings.update_rule`` (``config.memory``) says.

  "momentum": :func:`momentum_update` in batch order with ``settings.momentum``; "hard": its
  hard variant; "bmw": :func:`bmw_update` with ``settings.bmw_pull``, ``bmw_push`` and
  ``bmw_dynamic_weights``. ``labels`` are the hard pseudo labels (also with RLCC's soft
  targets). A ``MemoryState`` comes back as one, with its ``valid`` mask kept out of BMW's
  neighbours; a bare (K, D) array comes back as an array (every row counted as real).

  Raises:
    ValueError: an unknown ``settings.update_rule``.
  """
  state = memory if isinstance(memory, MemoryState) else None
  centroids = memory.centroids if isinstance(memory, MemoryState) else memory
  kind = settings.update_rule
  if kind in ("momentum", "hard"):
    new = momentum_update(centroids, features, labels, settings.momentum, hard=kind == "hard")
  elif kind == "bmw":
    new = bmw_update(
      centroids,
      features,
      labels,
      pull=settings.bmw_pull,
      push=settings.bmw_push,
      dynamic_weights=settings.bmw_dynamic_weights,
      valid=None if state is None else state.valid,
    )
  else:
    raise ValueError(
      f"config.memory.update_rule = {kind!r}: accepted: {', '.join(repr(u) for u in UPDATE_RULES)}"
    )
  return new if state is None else dataclasses.replace(state, centroids=new)
