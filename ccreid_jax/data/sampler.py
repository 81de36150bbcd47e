"""Camera-aware PxK sampler over pseudo labels (docs/algorithms.md section 3).

One *pass* visits every pseudo identity once, in a random order, and turns each into a block of
K = ``num_instances`` dataset indices:

* a random anchor among the identity's images;
* K-1 images drawn from the identity's images taken by *another camera* than the anchor's,
  without replacement when at least K such images exist and with replacement otherwise;
* when no image of the identity comes from another camera, the K-1 are drawn from its other
  images by the same rule;
* an identity with a single image (a singleton class, e.g. an outlier kept as its own class)
  contributes that one image, once, as both reference samplers do.

The pass is the concatenation of its blocks, and the batches are consecutive ``batch_size``
slices of the stream of passes: a batch is P = batch_size / K whole blocks when every block
has K images, a block may straddle two batches when singletons shorten some, and batches run
across pass boundaries (a new shuffled pass starts when one is used up). Every batch has
exactly ``batch_size`` indices and an epoch is exactly ``num_batches`` batches. Outliers
(label -1) are never drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["CameraAwarePKSampler"]


class CameraAwarePKSampler:
  """Draws PxK batches of dataset indices, deterministically from ``seed``.

  Args:
    labels: (N,) integer pseudo label of each training index; -1 marks an outlier.
    cameras: (N,) integer camera of each training index.
    num_instances: K, the number of indices per identity in a batch.
    seed: seeds the sampler's ``np.random.default_rng``. Successive ``batches`` calls continue
      the same random stream (each call starts a fresh pass).

  Raises:
    ValueError: mismatched shapes, ``num_instances < 1`` or no labelled index at all.
  """

  def __init__(self, labels: np.ndarray, cameras: np.ndarray, num_instances: int, seed: int):
    labels = np.asarray(labels)
    cameras = np.asarray(cameras)
    if labels.ndim != 1 or labels.shape != cameras.shape:
      raise ValueError(f"labels {labels.shape} and cameras {cameras.shape} must be 1-D and equal")
    if num_instances < 1:
      raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    self.num_instances = int(num_instances)
    self._rng = np.random.default_rng(seed)

    kept = np.flatnonzero(labels >= 0)
    if kept.size == 0:
      raise ValueError("every label is -1 (outlier): nothing to sample")
    order = kept[np.argsort(labels[kept], kind="stable")]
    self.label_ids, starts = np.unique(labels[order], return_index=True)
    self._members: list[np.ndarray] = np.split(order.astype(np.int64), starts[1:])
    self._member_cameras: list[np.ndarray] = [cameras[m] for m in self._members]

  @property
  def num_labels(self) -> int:
    """Number of distinct non-outlier labels (blocks per pass)."""
    return len(self._members)

  def _block(self, label_index: int) -> np.ndarray:
    """The indices one identity contributes to a pass (K, or 1 for a singleton); anchor first."""
    k = self.num_instances
    members = self._members[label_index]
    member_cameras = self._member_cameras[label_index]
    a = int(self._rng.integers(members.size))
    anchor = members[a]
    if k == 1 or members.size == 1:
      return np.array([anchor], np.int64)
    pool = members[member_cameras != member_cameras[a]]
    if pool.size == 0:
      pool = np.delete(members, a)
    rest = self._rng.choice(pool, size=k - 1, replace=pool.size < k)
    return np.concatenate([[anchor], rest]).astype(np.int64)

  def _pass(self) -> np.ndarray:
    """The indices of one pass: its blocks, in the pass's shuffled label order."""
    order = self._rng.permutation(self.num_labels)
    return np.concatenate([self._block(int(i)) for i in order])

  def batches(self, num_batches: int, batch_size: int) -> Iterator[np.ndarray]:
    """Yields ``num_batches`` int64 arrays of ``batch_size`` dataset indices.

    Raises:
      ValueError: if ``batch_size`` is not a positive multiple of ``num_instances``.
    """
    k = self.num_instances
    if batch_size <= 0 or batch_size % k:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of num_instances={k}")
    stream = np.zeros(0, np.int64)
    pos = 0
    for _ in range(num_batches):
      while stream.size - pos < batch_size:
        stream = np.concatenate([stream[pos:], self._pass()])
        pos = 0
      yield stream[pos : pos + batch_size].copy()
      pos += batch_size
