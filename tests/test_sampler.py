"""Camera-aware PxK sampler: batch shapes, block structure, camera rule, passes, determinism."""

import collections

import numpy as np
import pytest

from ccreid_jax.data.sampler import CameraAwarePKSampler

K = 4


def _toy() -> tuple[np.ndarray, np.ndarray]:
  """Labels / cameras exercising every rule; returned shuffled so indices are not grouped.

  label 0: cameras 0 x5, 1 x5   -> any anchor has 5 >= K other-camera images (no replacement)
  label 1: cameras 0 x1, 1 x2   -> 1 or 2 other-camera images < K (with replacement)
  label 2: camera 3 x6          -> single camera, 5 other images >= K (no replacement)
  label 3: camera 2 x2          -> single camera, 1 other image (with replacement)
  label 4: one image            -> a block of that one image
  label 5: cameras 0 x1, 1 x3   -> anchor in camera 0: exactly K-1 candidates (still with
                                   replacement)
  label 7: cameras 0..4, 2 each -> 8 other-camera images
  label -1: 6 outliers
  """
  spec = {
    0: [0] * 5 + [1] * 5,
    1: [0, 1, 1],
    2: [3] * 6,
    3: [2, 2],
    4: [5],
    5: [0, 1, 1, 1],
    7: [0, 1, 2, 3, 4] * 2,
    -1: [0, 1, 2, 3, 4, 5],
  }
  labels = np.concatenate([[label] * len(cameras) for label, cameras in spec.items()])
  cameras = np.concatenate(list(spec.values()))
  order = np.random.default_rng(123).permutation(labels.size)
  return labels[order], cameras[order]


def _split_blocks(stream: np.ndarray, labels: np.ndarray, k: int) -> list[np.ndarray]:
  """The stream of drawn indices cut into blocks: 1 index for a one-image label, else K."""
  sizes = collections.Counter(labels[labels >= 0].tolist())
  blocks, i = [], 0
  while i < stream.size:
    size = 1 if sizes[labels[stream[i]]] == 1 else k
    blocks.append(stream[i : i + size])
    i += size
  return blocks


def _blocks(
  sampler: CameraAwarePKSampler, num_batches: int, batch_size: int, labels: np.ndarray
) -> list[np.ndarray]:
  stream = np.concatenate(list(sampler.batches(num_batches, batch_size)))
  return _split_blocks(stream, labels, sampler.num_instances)


def test_exact_number_and_size_of_batches():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=0)
  batches = list(sampler.batches(7, 12))
  assert len(batches) == 7
  assert all(b.shape == (12,) and np.issubdtype(b.dtype, np.integer) for b in batches)
  assert len(list(sampler.batches(0, 12))) == 0


def test_blocks_follow_the_camera_rules():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=1)
  blocks = _blocks(sampler, 75, 8, labels)  # 600 indices = 24 passes of 25 (6 x K + 1)
  assert sampler.num_labels == 7 and len(blocks) == 24 * 7
  for block in blocks:
    label = labels[block[0]]
    assert block.size == (1 if label == 4 else K)
    assert label != -1 and np.all(labels[block] == label)  # one label per K-block
    anchor, rest = block[0], block[1:]
    label_cameras = set(cameras[labels == label])
    if len(label_cameras) > 1:
      assert np.all(cameras[rest] != cameras[anchor])  # other cameras only
    if label in (0, 2, 7):  # enough candidates: without replacement
      assert len(set(rest.tolist())) == K - 1
    if label in (2, 3):  # single camera: drawn from the other images
      assert anchor not in rest
  # Labels with too few candidates are drawn with replacement (duplicates do appear).
  assert any(len(set(b[1:].tolist())) < K - 1 for b in blocks if labels[b[0]] == 1)
  assert any(len(set(b[1:].tolist())) < K - 1 for b in blocks if labels[b[0]] == 3)
  label5_camera0 = [b for b in blocks if labels[b[0]] == 5 and cameras[b[0]] == 0]
  assert label5_camera0 and any(len(set(b[1:].tolist())) < K - 1 for b in label5_camera0)


def test_outliers_never_sampled_and_anchors_vary():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=2)
  drawn = np.concatenate(list(sampler.batches(50, 16)))
  assert np.all(labels[drawn] >= 0)
  blocks = _split_blocks(drawn, labels, K)
  anchors = collections.Counter(b[0] for b in blocks if labels[b[0]] == 0)
  assert len(anchors) >= 6  # the anchor is random among the label's 10 images


def test_every_label_once_per_pass_and_batches_cross_passes():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=3)
  # 7 labels (25 indices) per pass; batches of 16 straddle pass boundaries and blocks.
  blocks = _blocks(sampler, 25, 16, labels)  # 400 indices = exactly 16 passes
  block_labels = np.array([labels[b[0]] for b in blocks])
  passes = block_labels.reshape(16, 7)
  for p in passes:
    assert sorted(p.tolist()) == [0, 1, 2, 3, 4, 5, 7]
  assert len({tuple(p) for p in passes}) > 1  # each pass is shuffled anew


def test_deterministic_per_seed():
  labels, cameras = _toy()
  a = list(CameraAwarePKSampler(labels, cameras, K, seed=7).batches(5, 8))
  b = list(CameraAwarePKSampler(labels, cameras, K, seed=7).batches(5, 8))
  c = list(CameraAwarePKSampler(labels, cameras, K, seed=8).batches(5, 8))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_singletons_are_drawn_once_and_batches_stay_full():
  """A one-image class (an outlier kept as its own class) gives one index per pass, not K.

  Both reference samplers emit a single-member class's image once; the batches are cut from
  the stream of passes, so every batch is still full.
  """
  labels = np.array([0] * 6 + [1, 2, 3] + [4] * 5)  # 1, 2, 3: singleton classes
  cameras = np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 0, 0, 1, 1, 2])
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=5)
  batches = list(sampler.batches(11, 8))  # 88 indices = 8 passes of 2 x K + 3
  assert all(b.shape == (8,) for b in batches)
  stream = np.concatenate(batches)
  counts = collections.Counter(stream.tolist())
  assert [counts[i] for i in (6, 7, 8)] == [8, 8, 8]  # once per pass each
  blocks = _split_blocks(stream, labels, K)
  assert sorted(b.size for b in blocks) == [1] * 24 + [K] * 16
  # A batch of only singletons: every index appears once per pass, batches still full.
  only = CameraAwarePKSampler(np.arange(6), np.zeros(6, int), K, seed=0)
  drawn = list(only.batches(3, 4))
  assert all(b.shape == (4,) for b in drawn)
  assert sorted(np.concatenate(drawn)[:6].tolist()) == list(range(6))


def test_single_instance_blocks():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, 1, seed=0)
  drawn = np.concatenate(list(sampler.batches(4, 4)))
  assert drawn.shape == (16,)
  assert sorted(labels[drawn[:7]].tolist()) == [0, 1, 2, 3, 4, 5, 7]


def test_invalid_arguments():
  labels, cameras = _toy()
  sampler = CameraAwarePKSampler(labels, cameras, K, seed=0)
  with pytest.raises(ValueError, match="multiple"):
    next(sampler.batches(1, 10))
  with pytest.raises(ValueError, match="outlier"):
    CameraAwarePKSampler(np.full(5, -1), np.zeros(5, int), K, seed=0)
  with pytest.raises(ValueError):
    CameraAwarePKSampler(labels, cameras[:-1], K, seed=0)
