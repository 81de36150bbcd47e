"""Train and test transforms that run inside ``jax.jit`` (docs/algorithms.md section 3).

Images arrive as uint8 (B, H, W, 3) that were already bicubic-resized once when the image cache
was built, so every remaining step is a cheap, vectorised array operation on the accelerator.
Drawing the random parameters (``sample_augment_params``) is separate from applying them
(``apply_augment``) so that tests can pin the geometry with fixed parameters.

Train transform, in the reference order: horizontal flip (p 0.5); zero-pad 10 pixels per side;
crop HxW at offsets uniform in [0, 2*pad]; scale to [0, 1]; normalise with the ImageNet mean and
std; random erasing (p 0.5; area 0.02-0.4 of the image; aspect 0.3-1/0.3; up to 100 tries) that
writes the constants 0.485 / 0.456 / 0.406 into the *normalised* tensor.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "ERASE_VALUES",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "AugmentParams",
  "apply_augment",
  "normalize",
  "sample_augment_params",
  "test_transform",
  "train_augment",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference's RandomErasing fills with these per-channel constants *after* Normalize.
ERASE_VALUES = IMAGENET_MEAN


@flax.struct.dataclass
class AugmentParams:
  """Per-image random parameters of the train transform (a pytree of arrays)."""

  flip: jax.Array  # (B,) bool: mirror horizontally.
  crop_y: jax.Array  # (B,) int32 in [0, 2*pad]: top row of the crop in the padded image.
  crop_x: jax.Array  # (B,) int32 in [0, 2*pad]: left column of the crop in the padded image.
  erase: jax.Array  # (B,) bool: apply random erasing.
  erase_box: jax.Array  # (B, 4) int32: top, left, height, width (zeros when not erasing).


def normalize(images: jax.Array | np.ndarray) -> jax.Array:
  """uint8 (or [0, 255] float) (..., 3) -> float32 ``(x / 255 - mean) / std``."""
  x = images.astype(jnp.float32) / 255.0
  mean, std = jnp.asarray(IMAGENET_MEAN, jnp.float32), jnp.asarray(IMAGENET_STD, jnp.float32)
  return jnp.subtract(x, mean) / std  # x - mean, a jax.Array for numpy images too


def test_transform(images: jax.Array) -> jax.Array:
  """The test transform after the resize: uint8 (B, H, W, 3) -> float32 normalised."""
  return normalize(images)


def sample_augment_params(
  key: jax.Array,
  batch: int,
  height: int,
  width: int,
  *,
  flip_prob: float = 0.5,
  pad: int = 10,
  erasing_prob: float = 0.5,
  erase_area: tuple[float, float] = (0.02, 0.4),
  erase_aspect: float = 0.3,
  erase_tries: int = 100,
) -> AugmentParams:
  """Draws the reference's random parameters for ``batch`` images of ``height`` x ``width``.

  Random erasing evaluates all ``erase_tries`` attempts at once and keeps the first whose box
  fits (``h < height`` and ``w < width``), which is the distribution of the reference's loop;
  when none fits the image is not erased.
  """
  keys = jax.random.split(key, 8)
  flip = jax.random.bernoulli(keys[0], flip_prob, (batch,))
  crop_y = jax.random.randint(keys[1], (batch,), 0, 2 * pad + 1, dtype=jnp.int32)
  crop_x = jax.random.randint(keys[2], (batch,), 0, 2 * pad + 1, dtype=jnp.int32)
  erase = jax.random.bernoulli(keys[3], erasing_prob, (batch,))

  tries = (batch, erase_tries)
  area = jax.random.uniform(keys[4], tries, minval=erase_area[0], maxval=erase_area[1])
  area = area * (height * width)
  aspect = jax.random.uniform(keys[5], tries, minval=erase_aspect, maxval=1.0 / erase_aspect)
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # round half to even, as Python
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_w < width) & (box_h < height)
  first = jnp.argmax(fits, axis=1)  # index of the first fitting attempt (0 if none fits)
  rows = jnp.arange(batch)
  erase = erase & fits.any(axis=1)
  box_h = jnp.where(erase, box_h[rows, first], 0)
  box_w = jnp.where(erase, box_w[rows, first], 0)
  # Inclusive ranges [0, height - h] and [0, width - w]; randint's maxval is exclusive.
  top = jax.random.randint(keys[6], (batch,), 0, height - box_h + 1, dtype=jnp.int32)
  left = jax.random.randint(keys[7], (batch,), 0, width - box_w + 1, dtype=jnp.int32)
  top = jnp.where(erase, top, 0)
  left = jnp.where(erase, left, 0)
  erase_box = jnp.stack([top, left, box_h, box_w], axis=1).astype(jnp.int32)
  return AugmentParams(flip=flip, crop_y=crop_y, crop_x=crop_x, erase=erase, erase_box=erase_box)


def apply_augment(images: jax.Array, params: AugmentParams, *, pad: int = 10) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 (B, H, W, 3) train-transformed with fixed ``params``.

  Order: horizontal flip, zero-pad ``pad`` on each side, crop HxW at (crop_y, crop_x), scale to
  [0, 1], ImageNet normalisation, then random erasing with the constants ``ERASE_VALUES``.
  """
  _, height, width, channels = images.shape
  x = jnp.where(params.flip[:, None, None, None], images[:, :, ::-1, :], images)
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image: jax.Array, y: jax.Array, x0: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(image, (y, x0, 0), (height, width, channels))

  x = normalize(jax.vmap(crop)(x, params.crop_y, params.crop_x))

  top, left, box_h, box_w = (params.erase_box[:, i, None, None] for i in range(4))
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = (
    (rows >= top)
    & (rows < top + box_h)
    & (cols >= left)
    & (cols < left + box_w)
    & params.erase[:, None, None]
  )
  return jnp.where(inside[..., None], jnp.asarray(ERASE_VALUES, jnp.float32), x)


def train_augment(
  key: jax.Array,
  images: jax.Array,
  *,
  flip_prob: float = 0.5,
  pad: int = 10,
  erasing_prob: float = 0.5,
  erase_area: tuple[float, float] = (0.02, 0.4),
  erase_aspect: float = 0.3,
  erase_tries: int = 100,
) -> jax.Array:
  """The whole train transform: ``apply_augment(images, sample_augment_params(key, ...))``."""
  batch, height, width, _ = images.shape
  params = sample_augment_params(
    key,
    batch,
    height,
    width,
    flip_prob=flip_prob,
    pad=pad,
    erasing_prob=erasing_prob,
    erase_area=erase_area,
    erase_aspect=erase_aspect,
    erase_tries=erase_tries,
  )
  return apply_augment(images, params, pad=pad)
