"""On-device augmentation: geometry vs a brute-force numpy version, erasing fill, distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax.data import augment

H, W, PAD = 12, 8, 3
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _brute_force(images: np.ndarray, flip, crop_y, crop_x, erase, boxes, pad: int) -> np.ndarray:
  """Pixel-by-pixel reference of the train transform with fixed parameters."""
  b, h, w, c = images.shape
  out = np.zeros((b, h, w, c), np.float32)
  for n in range(b):
    for i in range(h):
      for j in range(w):
        # Crop pixel (i, j) reads padded pixel (i + crop_y, j + crop_x).
        pi, pj = i + crop_y[n] - pad, j + crop_x[n] - pad
        if 0 <= pi < h and 0 <= pj < w:
          src_j = w - 1 - pj if flip[n] else pj
          value = images[n, pi, src_j].astype(np.float32)
        else:
          value = np.zeros(c, np.float32)
        out[n, i, j] = (value / np.float32(255.0) - _MEAN) / _STD
        top, left, bh, bw = boxes[n]
        if erase[n] and top <= i < top + bh and left <= j < left + bw:
          out[n, i, j] = _MEAN
  return out


def _params(flip, crop_y, crop_x, erase, boxes) -> augment.AugmentParams:
  return augment.AugmentParams(
    flip=jnp.asarray(flip, bool),
    crop_y=jnp.asarray(crop_y, jnp.int32),
    crop_x=jnp.asarray(crop_x, jnp.int32),
    erase=jnp.asarray(erase, bool),
    erase_box=jnp.asarray(boxes, jnp.int32),
  )


def test_apply_matches_brute_force_at_extreme_offsets():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(6, H, W, 3), dtype=np.uint8)
  flip = [False, True, False, True, True, False]
  crop_y = [0, 0, 2 * PAD, 2 * PAD, PAD, 1]
  crop_x = [0, 2 * PAD, 0, 2 * PAD, PAD, 4]
  erase = [False, True, True, False, True, True]
  boxes = [
    [0, 0, 0, 0],
    [2, 1, 5, 3],
    [0, 0, H - 1, W - 1],
    [1, 1, 2, 2],
    [H - 3, W - 2, 3, 2],
    [4, 0, 1, W - 1],
  ]
  params = _params(flip, crop_y, crop_x, erase, boxes)
  want = _brute_force(images, flip, crop_y, crop_x, erase, boxes, PAD)
  got = np.asarray(augment.apply_augment(jnp.asarray(images), params, pad=PAD))
  assert got.dtype == np.float32 and got.shape == images.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  jitted = jax.jit(functools.partial(augment.apply_augment, pad=PAD))(jnp.asarray(images), params)
  np.testing.assert_allclose(np.asarray(jitted), want, rtol=0, atol=1e-6)


def test_identity_parameters_equal_test_transform():
  images = np.random.default_rng(1).integers(0, 256, size=(3, H, W, 3), dtype=np.uint8)
  params = _params([False] * 3, [PAD] * 3, [PAD] * 3, [False] * 3, [[0, 0, 0, 0]] * 3)
  got = augment.apply_augment(jnp.asarray(images), params, pad=PAD)
  np.testing.assert_allclose(np.asarray(got), np.asarray(augment.test_transform(images)), atol=1e-6)
  flipped = _params([True] * 3, [PAD] * 3, [PAD] * 3, [False] * 3, [[0, 0, 0, 0]] * 3)
  got = augment.apply_augment(jnp.asarray(images), flipped, pad=PAD)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(augment.test_transform(images[:, :, ::-1])), atol=1e-6
  )


def test_erased_pixels_are_exactly_the_constants():
  images = np.full((1, H, W, 3), 200, np.uint8)
  params = _params([False], [PAD], [PAD], [True], [[3, 2, 4, 5]])
  out = np.asarray(augment.apply_augment(jnp.asarray(images), params, pad=PAD))
  box = out[0, 3:7, 2:7]
  for c, value in enumerate((0.485, 0.456, 0.406)):
    assert np.all(box[..., c] == np.float32(value))
  mask = np.zeros((H, W), bool)
  mask[3:7, 2:7] = True
  np.testing.assert_allclose(
    out[0][~mask], np.broadcast_to((200 / 255 - _MEAN) / _STD, ((~mask).sum(), 3)), atol=1e-6
  )


def test_test_transform_values():
  images = np.array([[[[0, 0, 0], [255, 255, 255]], [[128, 64, 32], [1, 2, 3]]]], np.uint8)
  got = np.asarray(augment.test_transform(jnp.asarray(images)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, (images / 255.0 - _MEAN) / _STD, atol=1e-6)
  np.testing.assert_allclose(got[0, 0, 0], -_MEAN / _STD, atol=1e-6)
  np.testing.assert_allclose(got[0, 0, 1], (1 - _MEAN) / _STD, atol=1e-6)


@pytest.fixture(scope="module")
def many_params():
  sample = jax.jit(augment.sample_augment_params, static_argnums=(1, 2, 3))
  return jax.tree.map(np.asarray, sample(jax.random.key(42), 4000, 128, 64))


def test_flip_and_crop_distributions(many_params):
  p = many_params
  assert p.flip.dtype == bool and p.crop_y.dtype == np.int32 and p.erase_box.dtype == np.int32
  assert 0.45 < p.flip.mean() < 0.55
  for offsets in (p.crop_y, p.crop_x):
    counts = np.bincount(offsets, minlength=21)
    assert counts.size == 21  # nothing above 2 * pad = 20
    expected = offsets.size / 21
    assert np.all(counts > 0.6 * expected) and np.all(counts < 1.4 * expected)
  assert not np.array_equal(p.crop_y, p.crop_x)


def test_erasing_distribution(many_params):
  p = many_params
  height, width = 128, 64
  assert 0.45 < p.erase.mean() < 0.55
  top, left, h, w = p.erase_box[p.erase].T
  assert np.all(p.erase_box[~p.erase] == 0)
  # The box lies inside the image and passed the reference's fit test.
  assert np.all((h < height) & (w < width) & (h > 0) & (w > 0))
  assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  # h = round(sqrt(a r)), w = round(sqrt(a / r)) for some area a and aspect r in range:
  # a lies in [(h-.5)(w-.5), (h+.5)(w+.5)] and r in [(h-.5)/(w+.5), (h+.5)/(w-.5)].
  area = height * width
  assert np.all((h + 0.5) * (w + 0.5) >= 0.02 * area)
  assert np.all((h - 0.5) * (w - 0.5) <= 0.4 * area)
  assert np.all((h + 0.5) / (w - 0.5) >= 0.3)
  assert np.all((h - 0.5) / (w + 0.5) <= 1 / 0.3)
  ratio = h * w / area
  assert ratio.min() < 0.04 and ratio.max() > 0.3  # the whole area range is used
  assert (h / w).min() < 0.4 and (h / w).max() > 2.5  # and the whole aspect range
  # Positions cover the allowed range: top in [0, H - h] inclusive.
  assert np.any(top == 0) and np.any(top + h == height)
  assert np.any(left == 0) and np.any(left + w == width)


def test_no_erasing_when_no_attempt_fits():
  p = augment.sample_augment_params(
    jax.random.key(0), 64, 4, 4, erasing_prob=1.0, erase_area=(0.9, 0.99), erase_tries=5
  )
  assert not np.any(np.asarray(p.erase))
  p = augment.sample_augment_params(jax.random.key(0), 64, 64, 32, erasing_prob=1.0)
  assert np.all(np.asarray(p.erase))


def test_train_augment_is_the_composition():
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(5, H, W, 3), dtype=np.uint8))
  key = jax.random.key(7)
  got = jax.jit(functools.partial(augment.train_augment, pad=PAD))(key, images)
  params = augment.sample_augment_params(key, 5, H, W, pad=PAD)
  want = augment.apply_augment(images, params, pad=PAD)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  assert np.all(np.asarray(params.crop_y) <= 2 * PAD)
