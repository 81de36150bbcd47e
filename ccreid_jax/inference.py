"""A trained model in use: embed images, search a gallery, export the model for serving.

Usable from a user's own code, without the training loop::

    from ccreid_jax.inference import Embedder, search

    embedder = Embedder.from_workdir("runs/market")         # the best checkpoint of a run
    features = embedder.embed(["a.jpg", "b.jpg"])           # (2, D) float32, unit rows
    result = search(embedder, ["query.jpg"], gallery_paths, topk=10)
    result.indices, result.distances                        # (1, 10) each, closest first

``embed`` applies the evaluation transform: decode with PIL, RGB, the bicubic resize of the
image cache (``data.cache.decode_image``), the test transform (``data.augment.test_transform``),
the model in eval mode, and, with ``flip``, the flip test (docs/algorithms.md section 11).
Its features are the ones the evaluation computes from the cached images.

Export for serving (each file gets a JSON sidecar, ``<file>.json``, that states the input
layout, dtype, value range, mean / std, image size, feature dimension and the checkpoint):

* ``export_stablehlo(embedder, out_dir)``: ``out_dir/model.stablehlo``, a serialised
  ``jax.export.Exported`` of the whole feature function (uint8 NHWC images in, features out,
  test transform included, batch size symbolic). It runs with JAX alone (``pip install jax
  flatbuffers``: JAX reads the file with ``flatbuffers``, which it does not install itself)::

      exported = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
      features = exported.call(images)        # (B, H, W, 3) uint8 -> (B, D) float32

* ``export_onnx(embedder, out_path)``: an ONNX model (converted by ``jax2onnx``) whose input
  is a float32 NCHW batch that is already resized and normalised, ``(x / 255 - mean) / std``
  with the ImageNet mean / std, the layout TensorRT, OpenVINO and ONNX Runtime users feed;
  ``onnx_input(images)`` makes it from uint8 NHWC images.

``run_search`` and ``run_export`` are what the command line's ``--mode search`` and
``--mode export`` call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ccreid_jax.data import augment
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data.cache import decode_image, load_image_cache
from ccreid_jax.evaluation import pairwise_distance, visualize
from ccreid_jax.distributed import make_mesh
from ccreid_jax.extract import eval_features, extract_features, make_extract_fn
from ccreid_jax.utils import write_atomic, write_json

__all__ = [
    "IMAGE_EXTENSIONS",
    "ExportUnavailableError",
    "InferencePathError",
    "ONNX_KERNELS",
    "ONNX_OPSET",
    "STABLEHLO_FILE",
    "Embedder",
    "SearchResult",
    "export_onnx",
    "export_stablehlo",
    "format_search_results",
    "list_images",
    "onnx_input",
    "read_run_config",
    "run_export",
    "run_search",
    "search",
    "search_and_draw",
]

logger = logging.getLogger("ccreid_jax")

IMAGE_EXTENSIONS = datasets_lib.FOLDER_IMAGE_EXTENSIONS
STABLEHLO_FILE = "model.stablehlo"  # File name of the StableHLO export in its folder.
# The converter version the ONNX export is written and tested for (scripts/test.sh installs it).
JAX2ONNX = "jax2onnx==0.17.1"
# The lowest opset that fits what jax2onnx writes (ReduceMean with its axes as an input).
ONNX_OPSET = 18
# The layer set the ONNX export is traced with: flax's plain layers, which jax2onnx maps to
# ONNX's Conv, MaxPool and Relu (the stem pool pads with -inf itself and pools with "VALID").
ONNX_KERNELS = "plain"
_STABLEHLO_PLATFORMS = ("cpu", "cuda")
_CHUNK_BATCHES = 8  # Batches decoded at a time by ``embed``: bounds host memory.


class InferencePathError(ValueError):
  """An image, folder or output path given to embed, search or export that cannot be used."""


class ExportUnavailableError(ImportError):
  """The packages an export needs (jax2onnx, onnx) are not installed."""


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


def _images_of(path: str) -> list[str]:
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
    raise ValueError(f"expected an (H, W, 3) image or an (N, H, W, 3) batch, got an array of "
                     f"shape {images_or_paths.shape}.")
  return list(images_or_paths)


def _resize_array(image: Any, height: int, width: int, index: int) -> np.ndarray:
  """An (H, W, 3) uint8 RGB array resized as the image cache resizes a decoded file.

  The array goes through ``decode_image`` as a lossless (PPM) file, so its resize is the
  cache's own.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image {index}: expected an (H, W, 3) uint8 RGB array or a file path, "
                     f"got an array of shape {image.shape} and dtype {image.dtype}.")
  if image.shape[:2] == (height, width):
    return image
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format="PPM")
  return decode_image(f"<image {index}>", height, width, data=encoded.getvalue())


def onnx_input(images: np.ndarray) -> np.ndarray:
  """The input of an ONNX export for (N, H, W, 3) uint8 RGB images of the export's size.

  float32 NCHW, ``(x / 255 - mean) / std`` with the ImageNet mean and std: the test
  transform (``data.augment.normalize``), transposed.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}.")
  return np.ascontiguousarray(np.asarray(augment.normalize(images)).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------
# The run's config.
# ---------------------------------------------------------------------------------------


def _overlay(base: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _overlay(out[key], value)
    else:
      out[key] = value
  return out


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in ``<workdir>/config.json``.

  Fields the file lacks (a run saved before they existed) take their
  ``ccreid_jax.configs.default`` values.

  Raises:
    FileNotFoundError: no ``config.json`` in ``workdir``.
    ValueError: the file is not a JSON object.
  """
  from ccreid_jax import validation, workdir as workdir_lib

  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not the folder of a "
                            "ccreid_jax run (train one with --mode train --workdir ...).")
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as exc:
    raise ValueError(f"{path} is not valid JSON: {exc}") from exc
  if not isinstance(saved, dict):
    raise ValueError(f"{path} does not hold a JSON object (a run's config).")
  defaults = validation.default_config()
  saved = _overlay(json.loads(defaults.to_json_best_effort()), saved)
  return ml_collections.ConfigDict(saved)


# ---------------------------------------------------------------------------------------
# Embedding.
# ---------------------------------------------------------------------------------------


def _precision_scope(precision: str):
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


class Embedder:
  """Features of images under the evaluation transform, from a model and its variables.

  Attributes:
    model: the flax module (``models.create_model``).
    variables: its variables (``params`` and ``batch_stats``), replicated on the devices.
    height, width: the size images are resized to (the run's ``data.height`` / ``width``).
    flip: the flip test (mean of an image's and its mirror's features, renormalised).
    batch_size: images per forward pass (at most; small inputs use a smaller power of two).
    precision: ``model.precision``: "default" or "float32" matrix products.
    source: where the variables came from (``workdir``, ``checkpoint``, ``step``,
      ``epoch``), or None; copied into export sidecars.
  """

  def __init__(self, model: Any, variables: Any, *, height: int, width: int, flip: bool = False,
               batch_size: int = 64, precision: str = "default", num_workers: int = 4,
               source: dict[str, Any] | None = None):
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
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str,
                  checkpoint: str | int | None = None, *, flip: bool | None = None,
                  batch_size: int | None = None) -> Embedder:
    """The model of a checkpoint of ``workdir`` (``train.load_variables``), set up by ``config``.

    The model fields and image size come from the run's saved config where it has one
    (``workdir.with_run_model_settings``), as ``--mode eval`` does; ``checkpoint`` defaults
    to ``config.eval.checkpoint``; ``flip`` and ``batch_size`` default to ``config.eval``'s.
    """
    from ccreid_jax import train

    config = train.run_model_config(config, workdir, checkpoint)
    model, variables, step, epoch = train.load_variables(config, workdir, checkpoint)
    which = (checkpoint if checkpoint is not None else
             "init" if (step, epoch) == (0, -1) else
             train.default_checkpoint(config, workdir, log=False))
    return cls(
        model, variables, height=config.data.height, width=config.data.width,
        flip=config.eval.flip if flip is None else flip,
        batch_size=config.eval.batch_size if batch_size is None else batch_size,
        precision=config.model.get("precision", "default"),
        num_workers=config.data.num_workers,
        source={"workdir": os.path.abspath(workdir), "checkpoint": str(which),
                "number": int(step), "epoch": int(epoch)})

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str | int | None = None, *,
                   flip: bool | None = None, batch_size: int | None = None) -> Embedder:
    """The model of a checkpoint of a run, set up by the run's own ``config.json``.

    ``checkpoint``: "best", "latest", a checkpoint number, the path of a checkpoint folder, or
    "init"; by default the run's ``eval.checkpoint`` ("best", or the latest checkpoint of a
    run that evaluated none).
    """
    return cls.from_config(read_run_config(workdir), workdir, checkpoint, flip=flip,
                           batch_size=batch_size)

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
        raise InferencePathError(f"{path!r} is a folder; pass image files "
                                 "(inference.list_images(folder) lists its images) or arrays.")
    if paths:
      out[[i for i, _ in paths]] = load_image_cache(
          [p for _, p in paths], self.height, self.width, None, progress=False,
          num_workers=self.num_workers)
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
    outputs = []
    for start in range(0, len(items), chunk):
      images = self.load_images(items[start:start + chunk])
      # Powers of two up to batch_size: few compiled shapes, little padding for small inputs.
      batch = min(self.batch_size, 1 << max(0, math.ceil(math.log2(len(images)))))
      with _precision_scope(self.precision):
        outputs.append(extract_features(self._extract_fn, self.variables, images,
                                        mesh=self._mesh, batch_size=batch, progress=False))
    return np.concatenate(outputs)

  def feature_function(self, *, normalized_nchw: bool = False, kernels: str = "plain"):
    """The unjitted feature function with the variables closed over (what exports trace).

    ``normalized_nchw=False``: (B, height, width, 3) uint8 (or [0, 255] float) -> (B, D),
    the test transform included. True: (B, 3, height, width) float32 already normalised.
    The model is rebuilt with the layer set ``kernels`` ("plain": flax's own layers) when it
    has that option; the parameters are the same.
    """
    model = _with_kernels(self.model, kernels)
    variables, flip = self.variables, self.flip
    if not normalized_nchw:
      return lambda images: eval_features(model, variables, images, flip=flip)
    return lambda x: eval_features(model, variables, jnp.transpose(x, (0, 2, 3, 1)), flip=flip,
                                   transform=None)


def _with_kernels(model: Any, kernels: str) -> Any:
  """``model`` with the layer set ``kernels`` when it has a ``kernels`` field, else ``model``."""
  fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
  return model.clone(kernels=kernels) if "kernels" in fields else model


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


def _top_k(query_features: np.ndarray, gallery_features: np.ndarray, topk: int,
           block: int = 1024) -> SearchResult:
  k = min(int(topk), gallery_features.shape[0])
  indices = np.empty((query_features.shape[0], k), np.int64)
  distances = np.empty((query_features.shape[0], k), np.float32)
  for start in range(0, query_features.shape[0], block):
    dist = pairwise_distance(query_features[start:start + block], gallery_features)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    indices[start:start + block] = order
    distances[start:start + block] = np.take_along_axis(dist, order, axis=1)
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


def search_and_draw(embedder: Embedder, query_paths: Sequence[str], gallery_paths: Sequence[str],
                    topk: int = 10, out_png: str | None = None,
                    max_rows: int = 16) -> list[dict[str, Any]]:
  """``search`` on image files, as records; with ``out_png``, a rank-list picture too.

  Returns one ``{"query": path, "matches": [{"rank", "path", "distance"}, ...]}`` per query.
  The picture (``visualize.search_rank_list_image``) shows the first ``max_rows`` queries.
  """
  result = search(embedder, list(query_paths), list(gallery_paths), topk)
  records = []
  for q, (row, dist) in enumerate(zip(result.indices, result.distances)):
    records.append({"query": str(query_paths[q]), "matches": [
        {"rank": r, "path": str(gallery_paths[g]), "distance": float(d)}
        for r, (g, d) in enumerate(zip(row, dist), start=1)]})
  if out_png:
    rows = min(len(query_paths), max_rows)
    image = visualize.search_rank_list_image(
        list(query_paths[:rows]), list(gallery_paths), result.indices[:rows],
        result.distances[:rows])
    visualize.save_png(out_png, image)
  return records


def format_search_results(records: Sequence[dict[str, Any]]) -> str:
  """``search_and_draw``'s records as text: per query its path, then rank, distance, path."""
  lines = []
  for record in records:
    lines.append(f"query {record['query']}")
    lines += [f"  {m['rank']:>3}  {m['distance']:.4f}  {m['path']}" for m in record["matches"]]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Export for serving.
# ---------------------------------------------------------------------------------------


def _describe_model(model: Any) -> dict[str, Any]:
  names = ("depth", "width", "last_stride", "pooling", "ibn", "dtype")
  out = {"class": type(model).__name__}
  for name in names:
    if hasattr(model, name):
      value = getattr(model, name)
      out[name] = value if isinstance(value, (bool, int, float, str)) else jnp.dtype(value).name
  return out


def _sidecar(embedder: Embedder, fmt: str, file_name: str, **fields: Any) -> dict[str, Any]:
  """What a serving stack needs to feed an export and read its output."""
  return {
      "format": fmt,
      "file": file_name,
      **fields,
      "height": embedder.height,
      "width": embedder.width,
      "channels": "RGB",
      "resize": ("PIL bicubic resize of the whole RGB image to height x width (no crop, no "
                 "padding), as ccreid_jax.data.cache.decode_image"),
      "mean": list(augment.IMAGENET_MEAN),
      "std": list(augment.IMAGENET_STD),
      "normalization": "(x / 255 - mean) / std per channel, x the RGB value in [0, 255]",
      "output_name": "features",
      "output_shape": ["batch", embedder.feature_dim],
      "output_dtype": "float32",
      "feature_dim": embedder.feature_dim,
      "l2_normalized": True,
      "distance": "squared Euclidean distance of the features: 2 - 2 cos",
      "flip": embedder.flip,
      "precision": embedder.precision,
      "checkpoint": embedder.source,
      "model": _describe_model(embedder.model),
      "jax_version": jax.__version__,
  }


def export_stablehlo(embedder: Embedder, out_dir: str, *, input_dtype: str = "uint8",
                     platforms: Sequence[str] = _STABLEHLO_PLATFORMS) -> str:
  """Writes the feature function as serialised StableHLO; returns the file's path.

  The file, ``out_dir/model.stablehlo``, holds a ``jax.export.Exported`` of
  (B, height, width, 3) RGB images -> (B, D) float32 L2-normalised features, with the test
  transform (and the flip test when the embedder has it) and the variables inside; B is
  symbolic (any batch size). Run it with JAX alone (and ``flatbuffers``, which JAX's
  serializer needs): ``jax.export.deserialize(bytearray(data)).call(images)``.
  ``out_dir/model.stablehlo.json`` describes it.

  Args:
    embedder: the model.
    out_dir: created if needed.
    input_dtype: "uint8" (values 0-255), or "float32" (values in [0, 255], not normalised).
    platforms: the platforms it is lowered for (default CPU and CUDA GPUs).
  """
  if input_dtype not in ("uint8", "float32"):
    raise ValueError(f"input_dtype must be 'uint8' or 'float32', got {input_dtype!r}.")
  os.makedirs(out_dir, exist_ok=True)
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, embedder.height, embedder.width, 3), jnp.dtype(input_dtype))
  with _precision_scope(embedder.precision):
    exported = jax.export.export(jax.jit(embedder.feature_function()),
                                 platforms=tuple(platforms))(spec)
  path = os.path.join(out_dir, STABLEHLO_FILE)
  write_atomic(path, bytes(exported.serialize()))
  write_json(path + ".json", _sidecar(
      embedder, "stablehlo", STABLEHLO_FILE,
      input_name="images", input_layout="NHWC",
      input_shape=["batch", embedder.height, embedder.width, 3], input_dtype=input_dtype,
      input_value_range=[0, 255], normalization_included=True,
      platforms=list(exported.platforms),
      calling_convention_version=exported.calling_convention_version,
      load="jax.export.deserialize(bytearray(open(file, 'rb').read())).call(images)"))
  return path


@contextlib.contextmanager
def _jax2onnx_fixes() -> Iterator[None]:
  """Works around two things of jax2onnx 0.17 for the duration of a conversion.

  * Its shape rule for ``jnp.power`` (GeM pooling) hands symbolic dimensions (the batch) to
    ``np.broadcast_shapes``, which raises TypeError; those shapes are broadcast with
    ``jax.lax.broadcast_shapes`` instead, which knows symbolic dimensions.
  * It imports every plugin it ships and logs a traceback for each whose optional package
    (equinox, dm_pix, ...) is missing; those warnings are silenced.
  """
  try:
    from jax2onnx.plugins.jax.numpy import pow as pow_plugin
  except ImportError:
    pow_plugin = None
  original = getattr(pow_plugin, "_broadcast_shape", None)

  def broadcast_shape(x_shape, y_shape):
    try:
      return original(x_shape, y_shape)
    except TypeError:
      return tuple(jax.lax.broadcast_shapes(tuple(x_shape), tuple(y_shape)))

  plugin_logger = logging.getLogger("jax2onnx.plugins.plugin_system")
  level = plugin_logger.level
  plugin_logger.setLevel(logging.ERROR)
  if original is not None:
    pow_plugin._broadcast_shape = broadcast_shape
  try:
    yield
  finally:
    if original is not None:
      pow_plugin._broadcast_shape = original
    plugin_logger.setLevel(level)


def export_onnx(embedder: Embedder, out_path: str, *, opset: int = ONNX_OPSET) -> str:
  """Writes the feature function as an ONNX model at ``out_path``; returns the path.

  Input ``images``: (batch, 3, height, width) float32, RGB, resized as the image cache does
  and normalised, ``(x / 255 - mean) / std`` with the ImageNet mean / std (``onnx_input``
  makes it from uint8 NHWC images); batch is dynamic. Output ``features``: (batch, D) float32
  L2-normalised (with the flip test when the embedder has it). ``<out_path>.json`` describes
  both. Needs the ``onnx`` packages (``pip install "ccreid_jax[export]"``) and the converter
  (``pip install --no-deps jax2onnx==0.17.1``: its own pins would downgrade orbax-checkpoint).
  """
  try:
    import onnx
    from jax2onnx import to_onnx
  except ImportError as exc:
    raise ExportUnavailableError(
        f"ONNX export needs the jax2onnx and onnx packages ({exc}); install them with "
        f'`pip install "ccreid_jax[export]"` and `pip install --no-deps {JAX2ONNX}` (the '
        "converter's own pins would downgrade orbax-checkpoint).") from exc
  folder = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(folder, exist_ok=True)
  spec = jax.ShapeDtypeStruct(("batch", 3, embedder.height, embedder.width), jnp.float32)
  with _jax2onnx_fixes(), _precision_scope(embedder.precision):
    function = embedder.feature_function(normalized_nchw=True, kernels=ONNX_KERNELS)
    proto = to_onnx(function, [spec], model_name="ccreid_jax_features", opset=int(opset),
                    input_names=["images"], output_names=["features"])
  write_atomic(out_path, proto.SerializeToString())
  write_json(out_path + ".json", _sidecar(
      embedder, "onnx", os.path.basename(out_path),
      input_name="images", input_layout="NCHW",
      input_shape=["batch", 3, embedder.height, embedder.width], input_dtype="float32",
      input_value_range="normalised: (x / 255 - mean) / std",
      normalization_included=False, opset=int(opset),
      converter=f"jax2onnx {_version('jax2onnx')}", onnx_version=onnx.__version__))
  return out_path


def _version(package: str) -> str:
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"


# ---------------------------------------------------------------------------------------
# Command-line entry points.
# ---------------------------------------------------------------------------------------


def run_search(config: ml_collections.ConfigDict, workdir: str, query: str, gallery: str, *,
               topk: int = 10, out_png: str | None = None,
               checkpoint: str | int | None = None) -> tuple[list[dict[str, Any]], str]:
  """``--mode search``: ranks the images of folder ``gallery`` for each query image.

  ``query`` is an image file or a folder of them; ``gallery`` a folder (or one file). The
  model is the checkpoint of ``workdir`` chosen as ``--mode eval`` chooses it. Returns
  ``(records, png)``: ``search_and_draw``'s records (``format_search_results`` prints them)
  and the rank-list picture written, ``out_png`` (default
  ``<workdir>/search_ranklist.png``).

  Raises:
    InferencePathError: a query or gallery path that is missing or holds no image.
  """
  query_paths, gallery_paths = _images_of(query), _images_of(gallery)
  embedder = Embedder.from_config(config, workdir, checkpoint)
  out_png = out_png or os.path.join(workdir, "search_ranklist.png")
  return search_and_draw(embedder, query_paths, gallery_paths, topk, out_png), out_png


def run_export(config: ml_collections.ConfigDict, workdir: str, fmt: str, out: str, *,
               checkpoint: str | int | None = None) -> dict[str, Any]:
  """``--mode export``: writes a checkpoint of ``workdir`` as ``fmt`` ("stablehlo" or "onnx").

  ``out`` is the folder of a StableHLO export, the ``.onnx`` file of an ONNX one. Returns
  the sidecar's contents with ``path`` (the file written) and ``sidecar`` (its JSON file).

  Raises:
    InferencePathError: ``out`` missing, a file for stablehlo or a folder for onnx.
    ExportUnavailableError: onnx without the jax2onnx / onnx packages.
  """
  if fmt not in ("stablehlo", "onnx"):
    raise ValueError(f"export format must be 'stablehlo' or 'onnx', got {fmt!r}.")
  if not out:
    raise InferencePathError("the export needs an output path (--out): a folder for "
                             "stablehlo, a .onnx file for onnx.")
  if fmt == "stablehlo" and os.path.isfile(out):
    raise InferencePathError(f"--out {out} is a file; a StableHLO export is written into a "
                             f"folder (it holds {STABLEHLO_FILE} and its .json).")
  if fmt == "onnx" and os.path.isdir(out):
    raise InferencePathError(f"--out {out} is a folder; give the name of the file to write, "
                             f"e.g. {os.path.join(out, 'model.onnx')}.")
  embedder = Embedder.from_config(config, workdir, checkpoint)
  path = export_stablehlo(embedder, out) if fmt == "stablehlo" else export_onnx(embedder, out)
  with open(path + ".json") as f:
    summary = json.load(f)
  return dict(summary, path=path, sidecar=path + ".json")
