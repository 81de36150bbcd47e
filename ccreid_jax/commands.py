"""What a trained run is used for: the commands besides training, over its run folder.

Each command takes the config, the run folder and a checkpoint name ("best", "latest",
"init", a checkpoint number or a checkpoint folder; None: the run's default, see
``run.Run.default_reference``) and returns plain data; ``main.py`` maps ``--mode`` to them:

* ``evaluate``: mAP / CMC / mINP of a checkpoint on query / gallery (``eval_<label>.json``);
* ``extract``: the features of a split written to an ``.npz`` (``feature_files``);
* ``search``: the images of a gallery folder ranked for each query image (a rank-list PNG);
* ``export``: the model for serving, as StableHLO or ONNX (``export``);
* ``sweep``: DBSCAN's radius swept on the train features of one model
  (``tools.eps_sweep``).

Every command evaluates the model the checkpoint holds: the model fields and image size come
from the run's saved config (``Run.model_config``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from ccreid_jax import distributed, pseudo_labels, validation
from ccreid_jax import export as export_lib
from ccreid_jax.data import loading
from ccreid_jax.errors import check_writable
from ccreid_jax.evaluation import visualize
from ccreid_jax.extract import FeatureExtractor, evaluate_variables
from ccreid_jax.feature_files import check_output_path, split_images, write_features
from ccreid_jax.inference import Embedder, InferencePathError, images_of, search_and_draw
from ccreid_jax.reporting import save_rank_list
from ccreid_jax.run import Run
from ccreid_jax.tools import eps_sweep
from ccreid_jax.utils import write_json

__all__ = ["evaluate", "export", "extract", "search", "sweep"]

logger = logging.getLogger("ccreid_jax")

Checkpoint = str | int | None


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, checkpoint: Checkpoint = None
) -> dict[str, Any]:
  """Evaluates a checkpoint of the run in ``workdir``.

  Prints nothing; returns mAP / CMC / mINP with the ``checkpoint`` (its number: the epochs
  done, 0 for the initial model) and its last ``epoch``, and writes them to
  ``<workdir>/eval_<label>.json`` (label: the number or "init", with the evaluation dataset
  appended for a cross-domain evaluation) with a rank-list picture.
  """
  validation.validate_config(config, num_devices=None)
  run = Run(workdir)
  config = run.model_config(config, checkpoint)
  data = loading.load_run_data(config, run.path, need_train=False)
  loaded = run.load_model(config, checkpoint)
  extractor = FeatureExtractor.create(loaded.model, config, flip=config.eval.flip)
  metrics, distmat = evaluate_variables(extractor, loaded.variables, data, config)
  results = dict(metrics, checkpoint=loaded.checkpoint.number, epoch=loaded.checkpoint.epoch)
  name = loaded.checkpoint.label
  if data.cross_domain:
    name += f"_{config.eval.dataset or config.data.name}"
  if distributed.is_primary():
    write_json(run.file(f"eval_{name}.json"), results)
    save_rank_list(config, run.path, data, distmat, name=f"eval_{name}")
  return results


def extract(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str,
  out: str,
  checkpoint: Checkpoint = None,
) -> dict[str, Any]:
  """Writes the features of ``split`` ("train", "query", "gallery") to ``out`` (.npz).

  Query and gallery come from ``config.eval.dataset`` when set. Returns a summary of what was
  written.
  """
  validation.validate_config(config, num_devices=None)
  check_output_path(out)
  run = Run(workdir)
  config = run.model_config(config, checkpoint)
  data = loading.load_run_data(config, run.path, need_train=split == "train")
  loaded = run.load_model(config, checkpoint)
  images, records = split_images(data, split)
  extractor = FeatureExtractor.create(
    loaded.model, config, flip=config.eval.flip and split != "train"
  )
  features = extractor(loaded.variables, images, desc=f"{split} extract")
  if distributed.is_primary():
    write_features(out, features, records, split)
  return {
    "out": out,
    "split": split,
    "num_images": len(records),
    "feature_dim": int(features.shape[1]),
    "checkpoint": loaded.checkpoint.number,
    "epoch": loaded.checkpoint.epoch,
  }


def search(
  config: ml_collections.ConfigDict,
  workdir: str,
  query: str,
  gallery: str,
  *,
  topk: int = 10,
  out_png: str | None = None,
  checkpoint: Checkpoint = None,
) -> tuple[list[dict[str, Any]], str]:
  """Ranks the images of folder ``gallery`` for each query image.

  ``query`` is an image file or a folder of them; ``gallery`` a folder (or one file). Returns
  ``(records, png)``: ``inference.search_and_draw``'s records
  (``inference.format_search_results`` prints them) and the rank-list picture written,
  ``out_png`` (default ``<workdir>/search_ranklist.png``). With
  ``config.data.skip_bad_images`` unreadable query and gallery files are left out (logged).

  Raises:
    InferencePathError: a query or gallery path that is missing or holds no image.
  """
  query_paths, gallery_paths = images_of(query), images_of(gallery)
  embedder = Embedder.from_config(config, workdir, checkpoint)
  out_png = out_png or Run(workdir).file("search_ranklist.png")
  return search_and_draw(
    embedder,
    query_paths,
    gallery_paths,
    topk,
    out_png,
    skip_bad_images=bool(config.data.skip_bad_images),
  ), out_png


def export(
  config: ml_collections.ConfigDict,
  workdir: str,
  fmt: str,
  out: str,
  *,
  checkpoint: Checkpoint = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes a checkpoint's model as ``fmt`` ("stablehlo" or "onnx") for serving.

  ``out`` is the folder of a StableHLO export, the ``.onnx`` file of an ONNX one. Returns
  the sidecar's contents with ``path`` (the file written) and ``sidecar`` (its JSON file).
  An existing export there is replaced only with ``overwrite``; a run's own files
  (``config.json``, ``checkpoints/``, ...: ``Run.owns``) never.

  Raises:
    InferencePathError: ``out`` missing, a file for stablehlo or a folder for onnx, files
      that exist (without ``overwrite``) or belong to a run; checked before anything loads.
    StorageError: the destination cannot be written (checked first too), or is full.
    ExportUnavailableError: onnx without the jax2onnx / onnx packages.
  """
  if fmt not in export_lib.FORMATS:
    raise ValueError(f"export format must be 'stablehlo' or 'onnx', got {fmt!r}.")
  if not out:
    raise InferencePathError(
      "the export needs an output path (--out): a folder for stablehlo, a .onnx file for onnx."
    )
  if fmt == "stablehlo" and os.path.isfile(out):
    raise InferencePathError(
      f"--out {out} is a file; a StableHLO export is written into a "
      f"folder (it holds {export_lib.STABLEHLO_FILE} and its .json)."
    )
  if fmt == "onnx" and os.path.isdir(out):
    raise InferencePathError(
      f"--out {out} is a folder; give the name of the file to write, "
      f"e.g. {os.path.join(out, 'model.onnx')}."
    )
  export_lib.check_export_paths(fmt, out, overwrite=overwrite, workdirs=(workdir,))
  check_writable(
    out if fmt == "stablehlo" else os.path.dirname(os.path.abspath(out)), "the export folder"
  )
  embedder = Embedder.from_config(config, workdir, checkpoint)
  path = (
    export_lib.export_stablehlo(embedder, out, overwrite=overwrite)
    if fmt == "stablehlo"
    else export_lib.export_onnx(embedder, out, overwrite=overwrite)
  )
  with open(path + ".json") as f:
    summary = json.load(f)
  return dict(summary, path=path, sidecar=path + ".json")


def _check_sweepable(config: ml_collections.ConfigDict) -> None:
  if config.cluster.method != "dbscan":
    raise validation.ConfigError(
      [
        f"config.cluster.method = {config.cluster.method!r}: the eps sweep runs DBSCAN, "
        "which has the radius eps; pass --config.cluster.method=dbscan"
      ]
    )


def sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  eps_values: list[float],
  *,
  checkpoint: Checkpoint = None,
  out: str | None = None,
) -> dict[str, Any]:
  """Sweeps DBSCAN's eps on the train features of a checkpoint of the run in ``workdir``.

  Args:
    config: the run's config (``cluster`` gives the distance, k's and ``min_samples``).
    workdir: the run folder (checkpoints; the image cache unless ``data.cache_dir``).
    eps_values: the radii (``tools.eps_sweep.parse_eps``), each in (0, 1).
    checkpoint: the checkpoint name (None: the run's default).
    out: folder for ``eps_sweep_<label>.json`` / ``.png`` (label: "init" or the number);
      None writes nothing.

  Returns:
    ``{"checkpoint", "epoch", "num_train", "distance", "min_samples", "configured_eps",
    "has_train_identities", "rows"}`` (``rows``: one ``tools.eps_sweep.label_row`` per eps),
    plus ``"json"`` and ``"png"`` paths when written.
  """
  # The initial model is what the first epoch clusters: without weights it would be a random
  # network, whose eps says nothing about a run from ImageNet. Refused as training is.
  sweeps_init = str(checkpoint if checkpoint is not None else config.eval.checkpoint) == "init"
  validation.validate_config(config, num_devices=None, training=sweeps_init)
  _check_sweepable(config)
  if config.cluster.reliable:
    logger.info(
      "cluster.reliable is set: the sweep shows plain DBSCAN at each eps (the "
      "reliability criterion's eps_tight / eps_loose are not swept)"
    )
  eps_values = eps_sweep.parse_eps(",".join(str(v) for v in eps_values))
  if out is not None and distributed.is_primary():
    check_writable(out, "the sweep's --out folder")
  run = Run(workdir)
  config = run.model_config(config, checkpoint)
  data = loading.load_run_data(config, run.path, need_train=True)
  assert data.train_images is not None  # need_train=True
  validation.check_cluster_sizes(config.cluster, data.num_train)
  loaded = run.load_model(config, checkpoint)
  extractor = FeatureExtractor.create(loaded.model, config)
  features = np.asarray(extractor(loaded.variables, data.train_images, desc="train extract"))
  # The features of a model that finished epoch e are clustered by epoch e + 1.
  distance = pseudo_labels.cluster_distance(
    features,
    data.train_cameras,
    config.cluster,
    epoch=loaded.checkpoint.epoch + 1,
    max_distance=max(eps_values),
  )
  rows = eps_sweep.sweep_rows(
    distance, eps_values, config.cluster.min_samples, data.train_identities
  )
  name = loaded.checkpoint.label
  result: dict[str, Any] = {
    "checkpoint": name,
    "epoch": loaded.checkpoint.epoch,
    "num_train": data.num_train,
    "distance": config.cluster.distance,
    "min_samples": int(config.cluster.min_samples),
    "configured_eps": float(config.cluster.eps),
    "has_train_identities": data.has_train_identities,
    "rows": rows,
  }
  if out is not None and distributed.is_primary():
    os.makedirs(out, exist_ok=True)
    result["json"] = os.path.join(out, f"eps_sweep_{name}.json")
    result["png"] = os.path.join(out, f"eps_sweep_{name}.png")
    write_json(result["json"], {k: v for k, v in result.items() if k not in ("json", "png")})
    title = (
      f"{config.data.name} {data.dataset.root}: checkpoint {name}, {data.num_train} "
      f"images, {config.cluster.distance}, min_samples {config.cluster.min_samples}"
    )
    visualize.save_png(result["png"], eps_sweep.sweep_image(rows, title=title))
  return result
