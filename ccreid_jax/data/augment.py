"""Train and test transforms on the accelerator (ALGORITHMS.md section 3).

Images arrive as uint8 (B, H, W, 3), already bicubic-resized to the model's input size
when the cache was built, so every remaining step is a cheap array operation that runs
inside ``jax.jit``. The random parameters are drawn separately from their application
(``sample_augment_params`` / ``apply_augment``), so tests can fix them.

Train transform, in the reference's order: horizontal flip (p 0.5); zero-pad 10; random
crop back to HxW (offsets uniform in [0, 2*pad]); scale to [0, 1]; normalise with the
ImageNet mean/std; random erasing (p 0.5, area 0.02-0.4 of the image, aspect 0.3-1/0.3,
up to 100 tries) that writes the constants 0.485/0.456/0.406 into the *normalised* tensor.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random erasing fills with these constants after normalisation, as the reference does.
ERASE_VALUES = IMAGENET_MEAN


@flax.struct.dataclass
class AugmentParams:
  """Per-image random parameters of the train transform."""

  flip: jax.Array  # (B,) bool: mirror horizontally.
  crop_y: jax.Array  # (B,) int32 in [0, 2*pad]: top of the crop in the padded image.
  crop_x: jax.Array  # (B,) int32 in [0, 2*pad]: left of the crop in the padded image.
  erase: jax.Array  # (B,) bool: apply random erasing.
  erase_box: jax.Array  # (B, 4) int32: top, left, height, width of the erased box.


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 255] float (B, H, W, 3) -> float32 ((x / 255) - mean) / std."""
  x = images.astype(jnp.float32) / 255.0
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def test_transform(images: jax.Array) -> jax.Array:
  """The test transform after the resize: scale to [0, 1] and normalise."""
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
  """Draws the reference's random parameters for a batch of ``batch`` images."""
  k_flip, k_cy, k_cx, k_erase, k_area, k_aspect, k_top, k_left = jax.random.split(key, 8)
  flip = jax.random.uniform(k_flip, (batch,)) < flip_prob
  crop_y = jax.random.randint(k_cy, (batch,), 0, 2 * pad + 1, dtype=jnp.int32)
  crop_x = jax.random.randint(k_cx, (batch,), 0, 2 * pad + 1, dtype=jnp.int32)
  erase = jax.random.uniform(k_erase, (batch,)) < erasing_prob

  # Every try at once; the first one whose box fits is used, as in the reference's loop.
  shape = (batch, erase_tries)
  area = height * width * jax.random.uniform(
      k_area, shape, minval=erase_area[0], maxval=erase_area[1])
  aspect = jax.random.uniform(k_aspect, shape, minval=erase_aspect, maxval=1.0 / erase_aspect)
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_w < width) & (box_h < height)
  # randint(0, H - h) inclusive, drawn as floor(u * (H - h + 1)).
  top = jnp.floor(jax.random.uniform(k_top, shape) * (height - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, shape) * (width - box_w + 1)).astype(jnp.int32)
  top = jnp.clip(top, 0, jnp.maximum(height - box_h, 0))
  left = jnp.clip(left, 0, jnp.maximum(width - box_w, 0))
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  erase = erase & jnp.any(fits, axis=1)
  erase_box = jnp.stack([pick(top), pick(left), pick(box_h), pick(box_w)], axis=1)
  return AugmentParams(flip=flip, crop_y=crop_y, crop_x=crop_x, erase=erase,
                       erase_box=erase_box)


def apply_augment(images: jax.Array, params: AugmentParams, *, pad: int = 10) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 normalised, with the given random parameters."""
  b, h, w, c = images.shape
  x = jnp.where(params.flip[:, None, None, None], images[:, :, ::-1, :], images)
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image, y, x0):
    return jax.lax.dynamic_slice(image, (y, x0, 0), (h, w, c))

  x = jax.vmap(crop)(x, params.crop_y, params.crop_x)
  x = normalize(x)

  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  top, left, box_h, box_w = (params.erase_box[:, i, None, None] for i in range(4))
  inside = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
            & params.erase[:, None, None])
  fill = jnp.asarray(ERASE_VALUES, jnp.float32)
  return jnp.where(inside[..., None], fill, x)


def train_augment(key: jax.Array, images: jax.Array, *, flip_prob: float = 0.5, pad: int = 10,
                  erasing_prob: float = 0.5) -> jax.Array:
  """The whole train transform: sample parameters with ``key`` and apply them."""
  b, h, w, _ = images.shape
  params = sample_augment_params(key, b, h, w, flip_prob=flip_prob, pad=pad,
                                 erasing_prob=erasing_prob)
  return apply_augment(images, params, pad=pad)
