"""Camera-aware PxK sampler over pseudo labels (ALGORITHMS.md section 3).

Per pass over the pseudo identities (in a random order), each identity contributes one
block of K = ``num_instances`` indices: a random anchor, then K-1 of the identity's images
taken from *other cameras* than the anchor's (without replacement when at least K such
images exist, with replacement otherwise); an identity seen by one camera only draws
from its other images by the same rule; an identity with a single image repeats it.
A batch is P = batch_size / K consecutive blocks; batches run across pass boundaries, so
an epoch is exactly ``num_batches`` batches.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class CameraAwarePKSampler:
  """Draws PxK batches of dataset indices; outliers (label -1) are never drawn.

  Args:
    labels: (N,) pseudo label of each training image, -1 = outlier.
    cams: (N,) camera id of each training image.
    num_instances: K, images per identity in a batch.
    seed: seeds the sampler's numpy generator.
  """

  def __init__(self, labels: np.ndarray, cams: np.ndarray, num_instances: int, seed: int):
    labels = np.asarray(labels)
    cams = np.asarray(cams)
    if labels.shape != cams.shape or labels.ndim != 1:
      raise ValueError(f"labels {labels.shape} and cams {cams.shape} must be equal 1-D shapes")
    if num_instances < 1:
      raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    self.num_instances = num_instances
    self.cams = cams
    self._rng = np.random.default_rng(seed)
    kept = np.flatnonzero(labels >= 0)
    order = kept[np.argsort(labels[kept], kind="stable")]
    self.label_ids, starts = np.unique(labels[order], return_index=True)
    self._members = np.split(order, starts[1:]) if order.size else []
    if not self._members:
      raise ValueError("no labelled sample to draw from (every label is -1)")

  @property
  def num_labels(self) -> int:
    return len(self._members)

  def _block(self, members: np.ndarray) -> np.ndarray:
    k = self.num_instances
    anchor = members[self._rng.integers(members.size)]
    if k == 1:
      return np.array([anchor])
    others = members[members != anchor]
    if others.size == 0:
      return np.full(k, anchor)
    other_cams = others[self.cams[others] != self.cams[anchor]]
    pool = other_cams if other_cams.size else others
    replace = pool.size < k
    rest = self._rng.choice(pool, size=k - 1, replace=replace)
    return np.concatenate([[anchor], rest])

  def _pass(self) -> np.ndarray:
    order = self._rng.permutation(self.num_labels)
    return np.concatenate([self._block(self._members[i]) for i in order])

  def batches(self, num_batches: int, batch_size: int) -> Iterator[np.ndarray]:
    """Yields ``num_batches`` int64 arrays of ``batch_size`` indices."""
    if batch_size % self.num_instances:
      raise ValueError(
          f"batch_size={batch_size} must be a multiple of num_instances={self.num_instances}")
    buffer = np.zeros(0, np.int64)
    for _ in range(num_batches):
      while buffer.size < batch_size:
        buffer = np.concatenate([buffer, self._pass()])
      yield buffer[:batch_size].astype(np.int64)
      buffer = buffer[batch_size:]
