"""Feature extraction: the eval-mode model over a uint8 image array, streamed in batches.

Batches are gathered on the host from the (possibly memory-mapped) uint8 cache, moved
to the devices sharded along the batch axis while the previous batch is computed, and
the L2-normalised features come back to the host one batch at a time, so the host never
holds more than the output array and two input batches.

With ``flip=True`` (the flip test, docs/algorithms.md section 11) an image's feature is the
mean of the features of the image and of its horizontal mirror, L2-normalised again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax import distributed, evaluation
from ccreid_jax.data import loading
from ccreid_jax.data.augment import test_transform
from ccreid_jax.ops import l2_normalize
from ccreid_jax.utils import prefetch, progress_bar

__all__ = [
  "ExtractFn",
  "FeatureExtractor",
  "eval_features",
  "evaluate_variables",
  "extract_and_allgather",
  "extract_features",
  "make_extract_fn",
  "precision_scope",
  "with_precision",
]

ExtractFn = Callable[[Any, jax.Array], jax.Array]


def precision_scope(precision: str) -> contextlib.AbstractContextManager[Any]:
  """``jax.default_matmul_precision(precision)``, or nothing for "default"."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


class _WithPrecision:
  """A jitted function traced, compiled and run under ``jax.default_matmul_precision``."""

  def __init__(self, fn: Any, precision: str):
    self._fn = fn
    self._precision = precision

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    with jax.default_matmul_precision(self._precision):
      return self._fn(*args, **kwargs)

  def lower(self, *args: Any, **kwargs: Any) -> Any:
    with jax.default_matmul_precision(self._precision):
      return self._fn.lower(*args, **kwargs)


def with_precision(fn: Any, precision: str) -> Any:
  """``fn`` with ``model.precision`` applied to its matrix products and convolutions.

  "default" leaves JAX's default (which allows TF32 passes on Ampere / Hopper GPUs and
  bf16 passes on TPUs); "float32" asks for full float32 products, as the reference's
  PyTorch runs computed. The CPU computes float32 either way.
  """
  if precision == "default":
    return fn
  return _WithPrecision(fn, precision)


def _apply_eval(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  # Module.apply is typed for mutable collections too; without them it returns the output.
  return cast(jax.Array, model.apply(variables, images, train=False))


def eval_features(
  model: nn.Module,
  variables: Any,
  images: jax.Array,
  *,
  flip: bool = False,
  transform: Callable[[jax.Array], jax.Array] | None = test_transform,
) -> jax.Array:
  """``(B, D)`` float32 eval-mode features of NHWC ``images``.

  ``transform`` (default: the test transform, for uint8 or [0, 255] float images; None for
  images that are already normalised), then the model in eval mode (its features are
  L2-normalised). With ``flip``, the mean of the features of each image and of its
  horizontal mirror, L2-normalised again. Not jitted: the body of ``make_extract_fn`` and of
  exported feature functions.
  """
  transform = transform or (lambda x: x)
  features = _apply_eval(model, variables, transform(images)).astype(jnp.float32)
  if not flip:
    return features
  mirrored = _apply_eval(model, variables, transform(images[:, :, ::-1, :]))
  return l2_normalize(0.5 * (features + mirrored.astype(jnp.float32)))


def make_extract_fn(model: nn.Module, mesh: Mesh, flip: bool = False) -> ExtractFn:
  """Jitted ``(variables, uint8 images) -> (B, D) float32 features`` in eval mode.

  ``flip``: the flip test (see ``eval_features``); it costs a second forward pass.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))

  def extract(variables, images):
    return eval_features(model, variables, images, flip=flip)

  return jax.jit(extract, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded)


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
    batch = np.asarray(images[start : start + batch_size])
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
      outputs.append(np.asarray(pending[0])[: pending[1]])
      bar.update(pending[1])
    pending = (features, valid)
  if pending is not None:
    outputs.append(np.asarray(pending[0])[: pending[1]])
    bar.update(pending[1])
  bar.close()
  if not outputs:
    raise ValueError("extract_features got an empty image array")
  result = np.concatenate(outputs)
  assert result.shape[0] == n
  return result


def extract_and_allgather(
  extract_fn: ExtractFn,
  variables: Any,
  images: np.ndarray,
  *,
  mesh: Mesh,
  batch_size: int,
  progress: bool = False,
  desc: str = "extract",
) -> np.ndarray:
  """Features of all ``images`` on every process: each extracts its share, then all-gather.

  ``extract_fn`` must be built over ``mesh = local_mesh()`` (``make_extract_fn(model,
  distributed.local_mesh())``); ``variables`` may be the global replicated ones. Single process:
  plain ``extract_features``.
  """
  if jax.process_count() == 1:
    return extract_features(
      extract_fn, variables, images, mesh=mesh, batch_size=batch_size, progress=progress, desc=desc
    )
  n = images.shape[0]
  share, per = distributed.process_share(n)
  mine = np.asarray(images[share])
  if mine.shape[0] < per:  # the last share: pad to the common length.
    pad = np.zeros((per - mine.shape[0],) + images.shape[1:], images.dtype)
    mine = np.concatenate([mine, pad])
  local = extract_features(
    extract_fn,
    distributed.local_copy(variables),
    mine,
    mesh=mesh,
    batch_size=batch_size,
    progress=progress,
    desc=desc,
  )
  return distributed.allgather_features(local)[:n]


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """``extractor(variables, uint8 images, desc=...) -> (N, D)`` features on every process.

  Eval mode and the test transform; each process extracts its share on its own devices and
  the shares are all-gathered. ``flip``: the flip test (the mean of the features of each
  image and its mirror, normalised again), for evaluation only; clustering never flips.
  """

  extract_fn: ExtractFn  # the jitted (variables, images) -> features over ``mesh``.
  mesh: Mesh
  batch_size: int
  progress: bool = False

  @classmethod
  def create(
    cls, model: nn.Module, config: ml_collections.ConfigDict, *, flip: bool = False
  ) -> FeatureExtractor:
    """The extractor of ``model`` set up by ``config`` (``model.precision``,
    ``eval.batch_size``, ``log.progress``)."""
    mesh = distributed.local_mesh()
    extract_fn = with_precision(make_extract_fn(model, mesh, flip=flip), config.model.precision)
    return cls(
      extract_fn=extract_fn,
      mesh=mesh,
      batch_size=int(config.eval.batch_size),
      progress=bool(config.log.progress),
    )

  def __call__(self, variables: Any, images: np.ndarray, *, desc: str = "extract") -> np.ndarray:
    return extract_and_allgather(
      self.extract_fn,
      variables,
      images,
      mesh=self.mesh,
      batch_size=self.batch_size,
      progress=self.progress,
      desc=desc,
    )


def evaluate_variables(
  extract: FeatureExtractor,
  variables: Any,
  data: loading.RunData,
  config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], np.ndarray]:
  """``(mAP / CMC / mINP metrics, query x gallery distances)`` of ``data.eval_dataset``.

  ``extract`` is the evaluation's extractor
  (``FeatureExtractor.create(model, config, flip=config.eval.flip)``).
  """
  if data.test_images is None:
    raise ValueError("this run loaded no query / gallery images to evaluate.")
  features = extract(variables, data.test_images, desc="eval extract")
  return evaluation.evaluate_features(features, data.eval_dataset, config.eval)
