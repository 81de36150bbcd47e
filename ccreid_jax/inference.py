"""A trained model in use: embed images and search a gallery, from a user's own code.

    from ccreid_jax.inference import Embedder, search

    embedder = Embedder.from_workdir("runs/market")         # the best checkpoint of a run
    features = embedder.embed(["a.jpg", "b.jpg"])           # (2, D) float32, unit rows
    result = search(embedder, ["query.jpg"], gallery_paths, topk=10)
    result.indices, result.distances                        # (1, 10) each, closest first

``embed`` applies the evaluation transform: decode with PIL, RGB, the bicubic resize of the
image cache (``data.cache.decode_image``), the test transform (``data.augment.test_transform``),
the model in eval mode, and, with ``flip``, the flip test (docs/algorithms.md section 11).
Its features are the ones the evaluation computes from the cached images. The model can be
exported for serving with ``ccreid_jax.export``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data.cache import decode_image, load_image_cache, load_readable_images
from ccreid_jax.distributed import make_mesh
from ccreid_jax.evaluation import pairwise_distance, visualize
from ccreid_jax.extract import eval_features, extract_features, make_extract_fn, precision_scope
from ccreid_jax.run import Run
from ccreid_jax.utils import printable

__all__ = [
  "IMAGE_EXTENSIONS",
  "Embedder",
  "InferencePathError",
  "SearchResult",
  "format_search_results",
  "images_of",
  "list_images",
  "search",
  "search_and_draw",
]

IMAGE_EXTENSIONS = datasets_lib.FOLDER_IMAGE_EXTENSIONS
_CHUNK_BATCHES = 8  # Batches decoded at a time by ``embed``: bounds host memory.
# Embedder.load_images: the ways to skip unreadable files (search honours the config's flag).
_SKIP_HINT = (
  "skip unreadable images with --config.data.skip_bad_images=True (--mode search) "
  "or Embedder.embed_readable (from Python)"
)

logger = logging.getLogger("ccreid_jax")


class InferencePathError(ValueError):
  """An image, folder or output path given to embed, search or export that cannot be used."""


# ---------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------


def list_images(folder: str) -> list[str]:
  """The image files under ``folder`` (recursively), sorted by path.

  Images are recognised by extension (``IMAGE_EXTENSIONS``, any case).

  Raises:
    InferencePathError: ``folder`` is not a folder, or holds no image.
  """
  if not os.path.isdir(folder):
    raise InferencePathError(f"{folder!r} is not a folder.")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise InferencePathError(f"no image file ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}.")
  return sorted(found)


def images_of(path: str) -> list[str]:
  """``[path]`` for an image file, ``list_images(path)`` for a folder."""
  if os.path.isdir(path):
    return list_images(path)
  if not os.path.isfile(path):
    raise InferencePathError(f"{path!r}: no such image file or folder.")
  return [path]


def _is_path(item: Any) -> bool:
  return isinstance(item, (str, os.PathLike))


def _as_items(images_or_paths: Any) -> list[Any]:
  """A list of paths and (H, W, 3) arrays from what ``Embedder.embed`` accepts."""
  if _is_path(images_or_paths):
    return [images_or_paths]
  if isinstance(images_or_paths, np.ndarray):
    if images_or_paths.ndim == 3:
      return [images_or_paths]
    if images_or_paths.ndim == 4:
      return list(images_or_paths)
    raise ValueError(
      f"expected an (H, W, 3) image or an (N, H, W, 3) batch, got an array of "
      f"shape {images_or_paths.shape}."
    )
  return list(images_or_paths)


def _resize_array(image: Any, height: int, width: int, index: int) -> np.ndarray:
  """An (H, W, 3) uint8 RGB array resized as the image cache resizes a decoded file.

  The array goes through ``decode_image`` as a lossless (PPM) file, so its resize is the
  cache's own.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
      f"image {index}: expected an (H, W, 3) uint8 RGB array or a file path, "
      f"got an array of shape {image.shape} and dtype {image.dtype}."
    )
  if image.shape[:2] == (height, width):
    return image
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format="PPM")
  return decode_image(f"<image {index}>", height, width, data=encoded.getvalue())


# ---------------------------------------------------------------------------------------
# Embedding.
# ---------------------------------------------------------------------------------------


class Embedder:
  """Features of images under the evaluation transform, from a model and its variables.

  Attributes:
    model: the flax module (``models.create_model``).
    variables: its variables (``params`` and ``batch_stats``), replicated on the devices.
    height, width: the size images are resized to (the run's ``data.height`` / ``width``).
    flip: the flip test (mean of an image's and its mirror's features, renormalised).
    batch_size: images per forward pass (at most; small inputs use a smaller power of two).
    precision: ``model.precision``: "default" or "float32" matrix products.
    source: where the variables came from (``workdir``, ``checkpoint``: the name it was
      chosen by, ``number``, ``epoch``), or None; copied into export sidecars.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: Any,
    *,
    height: int,
    width: int,
    flip: bool = False,
    batch_size: int = 64,
    precision: str = "default",
    num_workers: int = 4,
    source: dict[str, Any] | None = None,
  ):
    if int(height) < 1 or int(width) < 1:
      raise ValueError(f"height and width must be positive, got {height} and {width}.")
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.model = model
    self.height, self.width = int(height), int(width)
    self.flip = bool(flip)
    self.batch_size = int(batch_size)
    self.precision = str(precision)
    self.num_workers = int(num_workers)
    self.source = dict(source) if source else None
    self._mesh = make_mesh(jax.local_devices())  # this process's devices
    self.variables = jax.device_put(variables, NamedSharding(self._mesh, PartitionSpec()))
    self._extract_fn = make_extract_fn(model, self._mesh, flip=self.flip)
    self._feature_dim: int | None = None

  @classmethod
  def from_config(
    cls,
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str | int | None = None,
    *,
    flip: bool | None = None,
    batch_size: int | None = None,
  ) -> Embedder:
    """The model of a checkpoint of the run in ``workdir``, set up by ``config``.

    The model fields and image size come from the run's saved config where it has one
    (``run.Run.model_config``), as ``--mode eval`` does; ``checkpoint`` ("best", "latest", a
    checkpoint number, the path of a checkpoint folder, or "init") defaults to the run's
    default (``run.Run.default_reference``); ``flip`` and ``batch_size`` default to
    ``config.eval``'s.
    """
    run = Run(workdir)
    config = run.model_config(config, checkpoint)
    loaded = run.load_model(config, checkpoint)
    return cls(
      loaded.model,
      loaded.variables,
      height=config.data.height,
      width=config.data.width,
      flip=config.eval.flip if flip is None else flip,
      batch_size=config.eval.batch_size if batch_size is None else batch_size,
      precision=config.model.get("precision", "default"),
      num_workers=config.data.num_workers,
      source={
        "workdir": os.path.abspath(workdir),
        "checkpoint": loaded.checkpoint.name,
        "number": loaded.checkpoint.number,
        "epoch": loaded.checkpoint.epoch,
      },
    )

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    checkpoint: str | int | None = None,
    *,
    flip: bool | None = None,
    batch_size: int | None = None,
  ) -> Embedder:
    """The model of a checkpoint of a run, set up by the run's own ``config.json``.

    ``checkpoint``: "best", "latest", a checkpoint number, the path of a checkpoint folder, or
    "init"; by default the run's ``eval.checkpoint`` ("best", or the latest checkpoint of a
    run that evaluated none).
    """
    return cls.from_config(
      Run(workdir).read_config(), workdir, checkpoint, flip=flip, batch_size=batch_size
    )

  @property
  def feature_dim(self) -> int:
    """D, the length of a feature."""
    if self._feature_dim is None:
      shape = jax.ShapeDtypeStruct((1, self.height, self.width, 3), jnp.uint8)
      out = jax.eval_shape(lambda x: eval_features(self.model, self.variables, x), shape)
      self._feature_dim = int(out.shape[-1])
    return self._feature_dim

  def load_images(self, images_or_paths: Any) -> np.ndarray:
    """(N, height, width, 3) uint8: files decoded and resized as the image cache does.

    Accepts what ``embed`` accepts.

    Raises:
      ImageDecodeError: naming the files that cannot be read.
      InferencePathError: a folder.
      ValueError: an array that is not an (H, W, 3) uint8 image.
    """
    items = _as_items(images_or_paths)
    out = np.empty((len(items), self.height, self.width, 3), np.uint8)
    paths = [(i, os.fspath(item)) for i, item in enumerate(items) if _is_path(item)]
    for _, path in paths:
      if os.path.isdir(path):
        raise InferencePathError(
          f"{path!r} is a folder; pass image files "
          "(inference.list_images(folder) lists its images) or arrays."
        )
    if paths:
      out[[i for i, _ in paths]] = load_image_cache(
        [p for _, p in paths],
        self.height,
        self.width,
        None,
        progress=False,
        num_workers=self.num_workers,
        skip_hint=_SKIP_HINT,
      )
    for i, item in enumerate(items):
      if not _is_path(item):
        out[i] = _resize_array(item, self.height, self.width, i)
    return out

  def embed(self, images_or_paths: Any) -> np.ndarray:
    """(N, D) float32 L2-normalised features, in the order given.

    Args:
      images_or_paths: image file paths, (H, W, 3) uint8 RGB arrays of any size (a list may
        mix both), an (N, H, W, 3) uint8 array, or one path or one image. Files and arrays
        are resized to (height, width) as the image cache does; folders are refused.
    """
    items = _as_items(images_or_paths)
    if not items:
      return np.zeros((0, self.feature_dim), np.float32)
    chunk = self.batch_size * _CHUNK_BATCHES
    return np.concatenate(
      [
        self._features(self.load_images(items[start : start + chunk]))
        for start in range(0, len(items), chunk)
      ]
    )

  def embed_readable(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``embed`` of image files that leaves the unreadable ones out (``skip_bad_images``).

    Returns:
      ``(features, kept, bad)``: the (K, D) features of the readable files, their (K,) int64
      indices into ``paths``, and one message per unreadable file.
    """
    paths = [os.fspath(p) for p in paths]
    for path in paths:
      if os.path.isdir(path):
        raise InferencePathError(
          f"{path!r} is a folder; pass image files "
          "(inference.list_images(folder) lists its images)."
        )
    chunk = self.batch_size * _CHUNK_BATCHES
    features = [np.zeros((0, self.feature_dim), np.float32)]
    kept: list[np.ndarray] = [np.zeros(0, np.int64)]
    bad: list[str] = []
    for start in range(0, len(paths), chunk):
      readable = load_readable_images(
        paths[start : start + chunk],
        self.height,
        self.width,
        None,
        progress=False,
        num_workers=self.num_workers,
      )
      bad += readable.bad
      if len(readable.kept):
        features.append(self._features(readable.images))
        kept.append(np.asarray(readable.kept, np.int64) + start)
    return np.concatenate(features), np.concatenate(kept), tuple(bad)

  def _features(self, images: np.ndarray) -> np.ndarray:
    """(N, D) features of (N, height, width, 3) uint8 images."""
    # Powers of two up to batch_size: few compiled shapes, little padding for small inputs.
    batch = min(self.batch_size, 1 << max(0, math.ceil(math.log2(len(images)))))
    with precision_scope(self.precision):
      return extract_features(
        self._extract_fn, self.variables, images, mesh=self._mesh, batch_size=batch, progress=False
      )

  def feature_function(
    self, *, normalized_nchw: bool = False, kernels: str = "plain", dtype: Any = None
  ):
    """The unjitted feature function with the variables closed over (what exports trace).

    ``normalized_nchw=False``: (B, height, width, 3) uint8 (or [0, 255] float) -> (B, D),
    the test transform included. True: (B, 3, height, width) float32 already normalised.
    The model is rebuilt with the layer set ``kernels`` ("plain": flax's own layers) when it
    has that option, and with the compute dtype ``dtype`` when given (None: the model's own);
    the parameters are the same.
    """
    model = _with_kernels(self.model, kernels)
    if dtype is not None and _has_field(model, "dtype"):
      model = model.clone(dtype=dtype)
    variables, flip = self.variables, self.flip
    if not normalized_nchw:
      return lambda images: eval_features(model, variables, images, flip=flip)
    return lambda x: eval_features(
      model, variables, jnp.transpose(x, (0, 2, 3, 1)), flip=flip, transform=None
    )


def _has_field(model: Any, name: str) -> bool:
  return dataclasses.is_dataclass(model) and name in {f.name for f in dataclasses.fields(model)}


def _with_kernels(model: nn.Module, kernels: str) -> nn.Module:
  """``model`` with the layer set ``kernels`` when it has a ``kernels`` field, else ``model``."""
  return model.clone(kernels=kernels) if _has_field(model, "kernels") else model


# ---------------------------------------------------------------------------------------
# Search.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Each query's closest gallery entries, closest first.

  Attributes:
    indices: (Q, k) int64 gallery indices; ties keep gallery order (a stable sort, as the
      evaluation ranks).
    distances: (Q, k) float32 squared Euclidean distances of the L2-normalised features,
      ``2 - 2 cos``, as the evaluation uses.
  """

  indices: np.ndarray
  distances: np.ndarray


def _top_k(
  query_features: np.ndarray, gallery_features: np.ndarray, topk: int, block: int = 1024
) -> SearchResult:
  k = min(int(topk), gallery_features.shape[0])
  indices = np.empty((query_features.shape[0], k), np.int64)
  distances = np.empty((query_features.shape[0], k), np.float32)
  for start in range(0, query_features.shape[0], block):
    dist = pairwise_distance(query_features[start : start + block], gallery_features)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    indices[start : start + block] = order
    distances[start : start + block] = np.take_along_axis(dist, order, axis=1)
  return SearchResult(indices=indices, distances=distances)


def search(embedder: Embedder, query: Any, gallery: Any, topk: int = 10) -> SearchResult:
  """Ranks ``gallery`` for every image of ``query`` by feature distance.

  Args:
    embedder: the model.
    query, gallery: what ``Embedder.embed`` accepts (paths, arrays).
    topk: entries kept per query (all of the gallery when it is smaller).

  Nothing is filtered out: unlike the evaluation protocol, identities and cameras are not
  known.
  """
  if int(topk) < 1:
    raise ValueError(f"topk must be >= 1, got {topk}.")
  gallery_features = embedder.embed(gallery)
  if gallery_features.shape[0] == 0:
    raise ValueError("the gallery is empty.")
  return _top_k(embedder.embed(query), gallery_features, topk)


def search_and_draw(
  embedder: Embedder,
  query_paths: Sequence[str],
  gallery_paths: Sequence[str],
  topk: int = 10,
  out_png: str | None = None,
  max_rows: int = 16,
  *,
  skip_bad_images: bool = False,
) -> list[dict[str, Any]]:
  """``search`` on image files, as records; with ``out_png``, a rank-list picture too.

  Returns one ``{"query": path, "matches": [{"rank", "path", "distance"}, ...]}`` per query.
  The picture (``visualize.search_rank_list_image``) shows the first ``max_rows`` queries.
  With ``skip_bad_images`` unreadable files are left out of the query and the gallery (as
  training leaves them out), and logged; otherwise they raise ``ImageDecodeError``.
  """
  query_paths, gallery_paths = list(query_paths), list(gallery_paths)
  if not skip_bad_images:
    result = search(embedder, query_paths, gallery_paths, topk)
  else:
    if int(topk) < 1:
      raise ValueError(f"topk must be >= 1, got {topk}.")
    found = {}
    for split, paths in (("gallery", gallery_paths), ("query", query_paths)):
      features, kept, bad = embedder.embed_readable(paths)
      if bad:
        logger.warning(
          "search: skipped %d unreadable %s image(s) of %d (first: %s)",
          len(bad),
          split,
          len(paths),
          bad[0],
        )
      if not len(kept):
        raise InferencePathError(
          f"no readable {split} image: all {len(paths)} cannot be read (first: {bad[0]})."
        )
      found[split] = features, [paths[i] for i in kept]
    (gallery_features, gallery_paths), (query_features, query_paths) = (
      found["gallery"],
      found["query"],
    )
    result = _top_k(query_features, gallery_features, topk)
  records = []
  for q, (row, dist) in enumerate(zip(result.indices, result.distances)):
    records.append(
      {
        "query": str(query_paths[q]),
        "matches": [
          {"rank": r, "path": str(gallery_paths[g]), "distance": float(d)}
          for r, (g, d) in enumerate(zip(row, dist), start=1)
        ],
      }
    )
  if out_png:
    rows = min(len(query_paths), max_rows)
    image = visualize.search_rank_list_image(
      list(query_paths[:rows]), list(gallery_paths), result.indices[:rows], result.distances[:rows]
    )
    visualize.save_png(out_png, image)
  return records


def format_search_results(records: Sequence[dict[str, Any]]) -> str:
  """``search_and_draw``'s records as text: per query its path, then rank, distance, path.

  Paths that are not valid UTF-8 show their bytes as ``\\xNN`` (``utils.printable``).
  """
  lines = []
  for record in records:
    lines.append(f"query {printable(record['query'])}")
    lines += [
      f"  {m['rank']:>3}  {m['distance']:.4f}  {printable(m['path'])}" for m in record["matches"]
    ]
  return "\n".join(lines)
