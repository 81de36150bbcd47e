"""The model exported for serving: StableHLO (JAX alone) and ONNX.

Each file gets a JSON sidecar, ``<file>.json``, that states the input layout, dtype, value
range, mean / std, image size, feature dimension and the checkpoint:

* ``export_stablehlo(embedder, out_dir)``: ``out_dir/model.stablehlo``, a serialised
  ``jax.export.Exported`` of the whole feature function (uint8 NHWC images in, features out,
  test transform included, batch size symbolic). It runs with JAX alone (``pip install jax
  flatbuffers``: JAX reads the file with ``flatbuffers``, which it does not install itself)::

      exported = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
      features = exported.call(images)        # (B, H, W, 3) uint8 -> (B, D) float32

* ``export_onnx(embedder, out_path)``: an ONNX model (converted by ``jax2onnx``) whose input
  is a float32 NCHW batch that is already resized and normalised, ``(x / 255 - mean) / std``
  with the ImageNet mean / std, the layout TensorRT, OpenVINO and ONNX Runtime users feed;
  ``onnx_input(images)`` makes it from uint8 NHWC images. The model computes in float32, also
  for a bfloat16 run (ONNX has no bfloat16 convolution); the file passes ONNX's full check.

The embedder is an ``inference.Embedder`` (e.g. ``Embedder.from_workdir(run_folder)``).
An export never writes over an existing file unless asked to (``overwrite=True``), and never
over a run's own files (``check_export_paths``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccreid_jax.data import augment
from ccreid_jax.extract import precision_scope
from ccreid_jax.inference import Embedder, InferencePathError
from ccreid_jax.run import CHECKPOINTS_FOLDER, CONFIG_FILE, METRICS_FILE, Run
from ccreid_jax.utils import write_atomic, write_json

__all__ = [
  "FORMATS",
  "ONNX_KERNELS",
  "ONNX_OPSET",
  "STABLEHLO_FILE",
  "ExportUnavailableError",
  "check_export_paths",
  "export_onnx",
  "export_paths",
  "export_stablehlo",
  "onnx_input",
]

logger = logging.getLogger("ccreid_jax")

FORMATS = ("stablehlo", "onnx")
STABLEHLO_FILE = "model.stablehlo"  # File name of the StableHLO export in its folder.
# The converter version the ONNX export is written and tested for (scripts/test.sh installs it).
JAX2ONNX = "jax2onnx==0.17.1"
# The lowest opset that fits what jax2onnx writes (ReduceMean with its axes as an input).
ONNX_OPSET = 18
# The layer set the ONNX export is traced with: flax's plain layers, which jax2onnx maps to
# ONNX's Conv, MaxPool and Relu (the stem pool pads with -inf itself and pools with "VALID").
ONNX_KERNELS = "plain"
_STABLEHLO_PLATFORMS = ("cpu", "cuda")


class ExportUnavailableError(ImportError):
  """The packages an export needs (jax2onnx, onnx) are not installed."""


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
# Where an export writes.
# ---------------------------------------------------------------------------------------


def export_paths(fmt: str, out: str) -> tuple[str, str]:
  """``(model file, sidecar)`` an export in ``fmt`` to ``out`` writes: ``out/model.stablehlo``
  for "stablehlo" (``out`` is a folder), ``out`` itself for "onnx"; the sidecar is the model
  file's path plus ``.json``."""
  path = os.path.join(out, STABLEHLO_FILE) if fmt == "stablehlo" else out
  return path, path + ".json"


def _runs_around(path: str, workdirs: Sequence[str]) -> list[Run]:
  """The runs ``workdirs`` and every folder above ``path`` that holds a run's files."""
  runs = [Run(w) for w in workdirs if w]
  folder = os.path.dirname(os.path.abspath(path))
  while True:
    if any(
      os.path.exists(os.path.join(folder, name))
      for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINTS_FOLDER)
    ):
      runs.append(Run(folder))
    parent = os.path.dirname(folder)
    if parent == folder:
      return runs
    folder = parent


def check_export_paths(
  fmt: str, out: str, *, overwrite: bool = False, workdirs: Sequence[str] = ()
) -> None:
  """Refuses an export whose files would replace a run's own files, or existing files.

  Args:
    fmt: "stablehlo" or "onnx".
    out: the export's ``--out`` (``export_paths``).
    overwrite: replace an existing model file and sidecar (never a run's own files).
    workdirs: runs whose files are protected besides those of any run folder above ``out``.

  Raises:
    InferencePathError: naming the file and the run it belongs to (a run's ``config.json``,
      ``metrics.jsonl``, ``checkpoints/``, ... : ``run.Run.owns``), or the files that exist
      and ``--overwrite``.
  """
  written = export_paths(fmt, out)
  for path in written:
    for run in _runs_around(path, workdirs):
      if run.owns(path):
        example = (
          os.path.join(run.path, "export")
          if fmt == "stablehlo"
          else os.path.join(run.path, "model.onnx")
        )
        raise InferencePathError(
          f"--out {out}: the export would write {path}, one of the files of the run in "
          f"{run.path}; an export never replaces a run's files (even with --overwrite). "
          f"Choose another --out, e.g. {example}."
        )
  existing = [path for path in written if os.path.lexists(path)]
  if existing and not overwrite:
    raise InferencePathError(
      f"--out {out}: {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}"
      "; pass --overwrite to replace the export (overwrite=True from Python), or choose "
      "another --out."
    )


# ---------------------------------------------------------------------------------------
# Export for serving.
# ---------------------------------------------------------------------------------------


def _describe_model(model: nn.Module) -> dict[str, Any]:
  names = ("depth", "width", "last_stride", "pooling", "ibn", "dtype")
  out: dict[str, Any] = {"class": type(model).__name__}
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
    "resize": (
      "PIL bicubic resize of the whole RGB image to height x width (no crop, no "
      "padding), as ccreid_jax.data.cache.decode_image"
    ),
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


def export_stablehlo(
  embedder: Embedder,
  out_dir: str,
  *,
  input_dtype: str = "uint8",
  platforms: Sequence[str] = _STABLEHLO_PLATFORMS,
  overwrite: bool = False,
) -> str:
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
    overwrite: replace an existing export there (never a run's own files).

  Raises:
    InferencePathError: the files exist (without ``overwrite``) or belong to a run
      (``check_export_paths``).
  """
  if input_dtype not in ("uint8", "float32"):
    raise ValueError(f"input_dtype must be 'uint8' or 'float32', got {input_dtype!r}.")
  check_export_paths("stablehlo", out_dir, overwrite=overwrite)
  os.makedirs(out_dir, exist_ok=True)
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, embedder.height, embedder.width, 3), jnp.dtype(input_dtype))
  with precision_scope(embedder.precision):
    exported = jax.export.export(jax.jit(embedder.feature_function()), platforms=tuple(platforms))(
      spec
    )
  path = os.path.join(out_dir, STABLEHLO_FILE)
  write_atomic(path, bytes(exported.serialize()))
  write_json(
    path + ".json",
    _sidecar(
      embedder,
      "stablehlo",
      STABLEHLO_FILE,
      input_name="images",
      input_layout="NHWC",
      input_shape=["batch", embedder.height, embedder.width, 3],
      input_dtype=input_dtype,
      input_value_range=[0, 255],
      normalization_included=True,
      compute_dtype=_compute_dtype(embedder.model) or "float32",
      platforms=list(exported.platforms),
      calling_convention_version=exported.calling_convention_version,
      load="jax.export.deserialize(bytearray(open(file, 'rb').read())).call(images)",
    ),
  )
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
    assert original is not None  # installed over an original only
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


def export_onnx(
  embedder: Embedder, out_path: str, *, opset: int = ONNX_OPSET, overwrite: bool = False
) -> str:
  """Writes the feature function as an ONNX model at ``out_path``; returns the path.

  Input ``images``: (batch, 3, height, width) float32, RGB, resized as the image cache does
  and normalised, ``(x / 255 - mean) / std`` with the ImageNet mean / std (``onnx_input``
  makes it from uint8 NHWC images); batch is dynamic. Output ``features``: (batch, D) float32
  L2-normalised (with the flip test when the embedder has it). The model computes in float32
  whatever its dtype (a bfloat16 run's sidecar notes it). ``<out_path>.json`` describes
  both. Needs the ``onnx`` packages (``pip install "ccreid_jax[export]"``) and the converter
  (``pip install --no-deps jax2onnx==0.17.1``: its own pins would downgrade orbax-checkpoint).
  An existing file and sidecar are replaced only with ``overwrite``, a run's own files never
  (``check_export_paths`` raises ``InferencePathError``).
  """
  check_export_paths("onnx", out_path, overwrite=overwrite)
  try:
    import onnx
    from jax2onnx import to_onnx
  except ImportError as exc:
    raise ExportUnavailableError(
      f"ONNX export needs the jax2onnx and onnx packages ({exc}); install them with "
      f'`pip install "ccreid_jax[export]"` and `pip install --no-deps {JAX2ONNX}` (the '
      "converter's own pins would downgrade orbax-checkpoint)."
    ) from exc
  folder = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(folder, exist_ok=True)
  spec = jax.ShapeDtypeStruct(("batch", 3, embedder.height, embedder.width), jnp.float32)
  # ONNX's Conv (and ONNX Runtime's kernels) take no bfloat16: the model computes in float32.
  run_dtype = _compute_dtype(embedder.model)
  with _jax2onnx_fixes(), precision_scope(embedder.precision):
    function = embedder.feature_function(
      normalized_nchw=True, kernels=ONNX_KERNELS, dtype=jnp.float32
    )
    proto = to_onnx(
      function,
      [spec],
      model_name="ccreid_jax_features",
      opset=int(opset),
      input_names=["images"],
      output_names=["features"],
    )
  proto = _shapes_inferred_again(proto)
  notes = {}
  if run_dtype not in (None, "float32"):
    notes["note"] = (
      f"exported in float32 from a {run_dtype} run (ONNX runtimes have no "
      "bfloat16 convolution); its features differ from the run's by the "
      f"{run_dtype} rounding"
    )
  write_atomic(out_path, proto.SerializeToString())
  write_json(
    out_path + ".json",
    _sidecar(
      embedder,
      "onnx",
      os.path.basename(out_path),
      input_name="images",
      input_layout="NCHW",
      input_shape=["batch", 3, embedder.height, embedder.width],
      input_dtype="float32",
      input_value_range="normalised: (x / 255 - mean) / std",
      normalization_included=False,
      opset=int(opset),
      compute_dtype="float32",
      **notes,
      converter=f"jax2onnx {_version('jax2onnx')}",
      onnx_version=onnx.__version__,
    ),
  )
  return out_path


def _compute_dtype(model: Any) -> str | None:
  """The name of ``model``'s compute dtype ("float32", "bfloat16"), or None if it has none."""
  dtype = getattr(model, "dtype", None)
  return None if dtype is None else jnp.dtype(dtype).name


def _shapes_inferred_again(proto: Any) -> Any:
  """``proto`` with its intermediate shapes (``value_info``) inferred by ONNX itself, checked.

  jax2onnx 0.17.1 records some intermediate shapes that ONNX's inference contradicts (GeM's
  ``1 / p``, a (1,) tensor, is written as a scalar), so ``onnx.checker.check_model(...,
  full_check=True)`` fails and ONNX Runtime warns "Error merging shape info" at every load.
  They are dropped and inferred again (strictly), and the model is checked before it is
  written.
  """
  import onnx

  del proto.graph.value_info[:]
  proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
  onnx.checker.check_model(proto, full_check=True)
  return proto


def _version(package: str) -> str:
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "unknown"
