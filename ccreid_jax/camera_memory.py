"""Camera-aware proxies and their inter-camera contrastive loss (docs/algorithms.md section 12).

The inter-camera term of PPLR (Cho et al., "Part-based Pseudo Label Refinement for Unsupervised
Person Re-identification", CVPR 2022; code ``yoonkicho/PPLR``, ``pplr/loss/loss.py``
``InterCamProxy``, built per epoch in ``examples/train_pplr_cam.py``). Every cluster is split
into one proxy per camera it was seen in: the L2-normalised mean of its members' features in
that camera. A sample is pulled towards its cluster's proxies in the *other* cameras, against
the ``K`` most similar proxies of other clusters:

  ``s_ij = <x_i / |x_i|, p_j> / tau``; ``P_i`` = proxies of cluster ``y_i`` in a camera other
  than ``c_i``; ``H_i`` = the ``K`` proxies of other clusters with the largest ``s_ij``;
  ``l_i = -(1 / |P_i|) sum_{p in P_i} log(exp(s_ip) / sum_{j in P_i u H_i} exp(s_ij))``;
  ``L = (1 / B) sum_i l_i``, with ``l_i = 0`` when ``P_i`` is empty.

The proxy bank changes size every epoch, so it is padded to a bucket
(:func:`ccreid_jax.memory.bucket_size`) with a ``valid`` mask, as the cluster memory; a jitted
train step compiles once per bucket. The proxies get no gradient. PPLR keeps them fixed for the
epoch; :func:`camera_proxy_update` optionally moves them with the sequential momentum rule of
CAP / O2CAP (``Terminator8758/CAP-master``, ``reid/loss/CamAwareMemory.py``), after and
outside the gradient.

:func:`build_camera_proxies` runs on the host (numpy); the rest are pure functions of arrays
that work under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ccreid_jax import memory as memory_lib
from ccreid_jax.clustering.centroids import cluster_centroids

# Smallest default bucket of the proxy bank (a bank has about clusters x cameras-per-cluster rows).
DEFAULT_MIN_BUCKET = 256
# Logit given to proxies outside a sample's positives and hard negatives: exp underflows to
# exactly 0 next to a real logit (bounded by 1 / temperature), and it stays finite so a row
# that selects nothing still has a finite log-normaliser and a zero (not NaN) gradient.
_UNSELECTED = -1e9


@flax.struct.dataclass
class CameraProxyState:
  """Padded proxy bank: one row per (cluster, camera) pair present, ordered by cluster, then camera.

  ``proxies`` (Ppad, D) float32 unit rows; ``cluster_ids`` and ``cameras`` (Ppad,) int32, the
  cluster and camera of each row (-1 on padding); ``valid`` (Ppad,) bool. Rows with
  ``valid == False`` are padding: the loss never selects them and the update never writes them.
  """

  proxies: jax.Array
  cluster_ids: jax.Array
  cameras: jax.Array
  valid: jax.Array

  @property
  def num_proxies(self) -> jax.Array:
    """Number of real (unpadded) proxies, an int32 scalar (works inside jit)."""
    return jnp.sum(self.valid, dtype=jnp.int32)

  @property
  def bucket(self) -> int:
    return self.proxies.shape[0]


def build_camera_proxies(
  features: np.ndarray,
  labels: np.ndarray,
  cameras: np.ndarray,
  bucket: int | None = None,
  min_bucket: int = DEFAULT_MIN_BUCKET,
) -> tuple[CameraProxyState, np.ndarray]:
  """The epoch's proxies: L2-normalised mean feature of every (cluster, camera) pair present.

  Args:
    features: (N, D) train features (the ones the pseudo labels were computed from).
    labels: (N,) integer pseudo labels, -1 = outlier (outliers make no proxy).
    cameras: (N,) integer cameras.
    bucket: rows of the padded bank; default ``memory.bucket_size(P, min_bucket)``.
    min_bucket: smallest default bucket.

  Returns:
    ``(state, sample_proxy_index)``: the padded :class:`CameraProxyState` and, for every
    sample, the row of its own (cluster, camera) proxy, -1 for outliers (int64, (N,)).

  Raises:
    ValueError: shapes that do not match, non-integer labels or cameras, a bucket smaller than
      the number of proxies, or a pair whose mean feature is the zero vector.
  """
  x = np.asarray(features)
  labels = np.asarray(labels)
  cameras = np.asarray(cameras)
  if x.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {x.shape}")
  if labels.shape != (x.shape[0],) or cameras.shape != (x.shape[0],):
    raise ValueError(
      f"labels {labels.shape} and cameras {cameras.shape} must both be "
      f"({x.shape[0]},), one per row of features {x.shape}"
    )
  for name, values in (("labels", labels), ("cameras", cameras)):
    if values.size and not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
  kept = labels >= 0
  pairs = np.zeros((0, 2), np.int64)
  sample_proxy_index = np.full(x.shape[0], -1, np.int64)
  if kept.any():
    pairs, inverse = np.unique(
      np.stack([labels[kept], cameras[kept]], axis=1).astype(np.int64), axis=0, return_inverse=True
    )
    sample_proxy_index[kept] = inverse.reshape(-1)
  # Proxy p's members are the samples whose index is p: the cluster-centroid computation.
  proxies = cluster_centroids(x, sample_proxy_index)
  num = pairs.shape[0]
  if bucket is None:
    bucket = memory_lib.bucket_size(num, min_bucket)
  if bucket < num:
    raise ValueError(f"bucket {bucket} is smaller than the number of camera proxies {num}")
  padded = np.zeros((bucket, x.shape[1]), np.float32)
  padded[:num] = proxies
  cluster_ids = np.full(bucket, -1, np.int32)
  row_cameras = np.full(bucket, -1, np.int32)
  cluster_ids[:num] = pairs[:, 0]
  row_cameras[:num] = pairs[:, 1]
  state = CameraProxyState(
    proxies=jnp.asarray(padded),
    cluster_ids=jnp.asarray(cluster_ids),
    cameras=jnp.asarray(row_cameras),
    valid=jnp.asarray(np.arange(bucket) < num),
  )
  return state, sample_proxy_index


def _hard_negative_mask(logits: jax.Array, negative: jax.Array, k: int) -> jax.Array:
  """(B, P) bool: the ``k`` negatives of largest logit per row (all of them when fewer)."""
  k = min(int(k), logits.shape[1])
  if k <= 0:
    return jnp.zeros_like(negative)
  scores = jnp.where(negative, jax.lax.stop_gradient(logits), -jnp.inf)
  _, hardest = jax.lax.top_k(scores, k)  # (B, k)
  rows = jnp.arange(logits.shape[0])[:, None]
  picked = jnp.zeros_like(negative).at[rows, hardest].set(True)
  # Rows with fewer than k negatives also got -inf entries: they are not negatives.
  return picked & negative


def camera_proxy_loss(
  features: jax.Array,
  state: CameraProxyState,
  labels: jax.Array,
  cameras: jax.Array,
  *,
  temperature: float,
  num_hard_negatives: int,
) -> jax.Array:
  """PPLR's inter-camera contrastive loss of a batch, a float32 scalar.

  Positives of sample i: the valid proxies of cluster ``labels[i]`` in a camera other than
  ``cameras[i]`` (its own-camera proxy is neither positive nor negative). Negatives: the
  ``num_hard_negatives`` valid proxies of other clusters with the largest logit (chosen on
  the logits without gradient); all of them when there are fewer (where PPLR's sort would fill
  its list with the own cluster's proxies; the two agree whenever the bank holds at least K
  proxies of other clusters). The loss of i is the cross-entropy of the softmax over positives
  and hard negatives against the uniform distribution on the positives; a sample with no
  positive (its cluster seen in one camera only) adds 0 but still counts in the batch mean, as
  in the reference.

  Args:
    features: (B, D) features of any norm (L2-normalised here; the gradient flows into them).
    state: the proxy bank (no gradient).
    labels: (B,) cluster ids of the samples.
    cameras: (B,) cameras of the samples.
    temperature: tau of the logits ``cos / tau``.
    num_hard_negatives: K.
  """
  logits = memory_lib.memory_logits(features, state.proxies, temperature, state.valid)
  labels = labels.astype(jnp.int32)[:, None]
  cameras = cameras.astype(jnp.int32)[:, None]
  same_cluster = state.cluster_ids[None, :] == labels
  positive = state.valid[None, :] & same_cluster & (state.cameras[None, :] != cameras)
  negative = state.valid[None, :] & ~same_cluster
  selected = positive | _hard_negative_mask(logits, negative, num_hard_negatives)
  log_norm = jax.nn.logsumexp(jnp.where(selected, logits, _UNSELECTED), axis=-1)
  num_positive = jnp.sum(positive, axis=-1)
  mean_positive = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / jnp.maximum(
    num_positive, 1
  ).astype(jnp.float32)
  per_sample = jnp.where(num_positive > 0, log_norm - mean_positive, 0.0)
  return jnp.mean(per_sample)


def own_proxy_index(state: CameraProxyState, labels: jax.Array, cameras: jax.Array) -> jax.Array:
  """(B,) int32 row of each sample's (cluster, camera) proxy; ``state.bucket`` when it has none."""
  match = (
    state.valid[None, :]
    & (state.cluster_ids[None, :] == labels.astype(jnp.int32)[:, None])
    & (state.cameras[None, :] == cameras.astype(jnp.int32)[:, None])
  )
  return jnp.where(jnp.any(match, axis=-1), jnp.argmax(match, axis=-1), state.bucket).astype(
    jnp.int32
  )


def camera_proxy_update(
  state: CameraProxyState,
  features: jax.Array,
  labels: jax.Array,
  cameras: jax.Array,
  momentum: float,
) -> CameraProxyState:
  """The bank after this batch's momentum update (a new state; features get no gradient).

  ``momentum >= 1`` returns ``state`` itself: PPLR keeps the proxies fixed for the epoch.
  Otherwise CAP / O2CAP's rule, sequential in batch order: every sample moves its own
  (cluster, camera) proxy, ``p <- l2norm(mu * p + (1 - mu) * x / |x|)`` (the scan of
  :func:`ccreid_jax.memory.momentum_update`). A sample whose pair has no proxy changes nothing
  (its row index is past the bank, and JAX drops out-of-bounds scatter updates).
  """
  if momentum >= 1.0:
    return state
  rows = own_proxy_index(state, labels, cameras)
  proxies = memory_lib.momentum_update(state.proxies, features, rows, momentum)
  return dataclasses.replace(state, proxies=proxies)
