"""Feature extraction: the eval-mode model over a uint8 image array, streamed in batches.

Batches are gathered on the host from the (possibly memory-mapped) uint8 cache, moved
to the devices sharded along the batch axis while the previous batch is computed, and
the L2-normalised features come back to the host one batch at a time, so the host never
holds more than the output array and two input batches.

With ``flip=True`` (the flip test, docs/algorithms.md section 11) an image's feature is the
mean of the features of the image and of its horizontal mirror, L2-normalised again.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax.data.augment import test_transform
from ccreid_jax.ops import l2_normalize
from ccreid_jax.utils import prefetch, progress_bar

ExtractFn = Callable[[Any, jax.Array], jax.Array]


def eval_features(model: Any, variables: Any, images: jax.Array, *, flip: bool = False,
                  transform: Callable[[jax.Array], jax.Array] | None = test_transform
                  ) -> jax.Array:
  """``(B, D)`` float32 eval-mode features of NHWC ``images``.

  ``transform`` (default: the test transform, for uint8 or [0, 255] float images; None for
  images that are already normalised), then the model in eval mode (its features are
  L2-normalised). With ``flip``, the mean of the features of each image and of its
  horizontal mirror, L2-normalised again. Not jitted: the body of ``make_extract_fn`` and of
  exported feature functions.
  """
  transform = transform or (lambda x: x)
  features = model.apply(variables, transform(images), train=False).astype(jnp.float32)
  if not flip:
    return features
  mirrored = model.apply(variables, transform(images[:, :, ::-1, :]), train=False)
  return l2_normalize(0.5 * (features + mirrored.astype(jnp.float32)))


def make_extract_fn(model: Any, mesh: Mesh, flip: bool = False) -> ExtractFn:
  """Jitted ``(variables, uint8 images) -> (B, D) float32 features`` in eval mode.

  ``flip``: the flip test (see ``eval_features``); it costs a second forward pass.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))

  def extract(variables, images):
    return eval_features(model, variables, images, flip=flip)

  return jax.jit(
      extract, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded)


def extract_features(
    extract_fn: ExtractFn,
    variables: Any,
    images: np.ndarray,
    *,
    mesh: Mesh,
    batch_size: int,
    progress: bool = True,
    desc: str = "extract",
) -> np.ndarray:
  """Features of every image in ``images`` (N, H, W, 3) uint8 -> (N, D) float32 numpy.

  ``batch_size`` is rounded up to a multiple of the device count; the last batch is
  zero-padded so the jitted function is compiled once.
  """
  num_devices = mesh.devices.size
  batch_size = -(-batch_size // num_devices) * num_devices
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  n = images.shape[0]

  def load(start: int) -> tuple[jax.Array, int]:
    batch = np.asarray(images[start:start + batch_size])
    valid = batch.shape[0]
    if valid < batch_size:  # zero-pad the last batch: one compiled shape
      pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    return jax.device_put(batch, sharding), valid

  outputs: list[np.ndarray] = []
  bar = progress_bar(total=n, desc=desc, unit="img", enabled=progress)
  pending: tuple[jax.Array, int] | None = None
  for device_batch, valid in prefetch(range(0, n, batch_size), load):
    features = extract_fn(variables, device_batch)  # dispatched before fetching the previous
    if pending is not None:
      outputs.append(np.asarray(pending[0])[:pending[1]])
      bar.update(pending[1])
    pending = (features, valid)
  if pending is not None:
    outputs.append(np.asarray(pending[0])[:pending[1]])
    bar.update(pending[1])
  bar.close()
  if not outputs:
    raise ValueError("extract_features got an empty image array")
  result = np.concatenate(outputs)
  assert result.shape[0] == n
  return result
