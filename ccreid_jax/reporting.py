"""What a run reports, in one place: metrics.jsonl, TensorBoard, pictures and the log line.

``Reporter.initial`` and ``Reporter.epoch`` take one record (the plain numbers of an
evaluation or an epoch) and write it everywhere it goes: a line of ``metrics.jsonl``, the
same scalars to TensorBoard (TensorBoard's step = the epochs done, a checkpoint's number), the
rank list of an evaluation (``ranklist_<name>.png``, also to TensorBoard), the training curves
(``curves.png``) and one log line. Only the primary process of a multi-process run writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from ccreid_jax import tensorboard as tensorboard_lib
from ccreid_jax.data import loading
from ccreid_jax.errors import StorageError
from ccreid_jax.evaluation import visualize
from ccreid_jax.run import Run

__all__ = ["Reporter", "epoch_line", "save_rank_list"]

logger = logging.getLogger("ccreid_jax")


def save_rank_list(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: loading.RunData,
  distmat: np.ndarray,
  *,
  name: str,
) -> Image.Image | None:
  """Draws ``<workdir>/ranklist_<name>.png`` of an evaluation; returns the image (or None).

  ``data`` is a ``data.loading.RunData``: its ``eval_dataset`` records and, for TFDS runs
  (whose record paths are not files), its decoded ``test_images``. A picture that cannot be
  written (a full disk) is a warning.
  """
  log = config.log
  if log.ranklist_queries <= 0:
    return None
  query, gallery = data.eval_dataset.query, data.eval_dataset.gallery
  queries = visualize.choose_queries(len(query), log.ranklist_queries, config.seed)
  query_images: Sequence[Any] | np.ndarray
  gallery_images: Sequence[Any] | np.ndarray
  if config.data.source == "tfds":
    assert data.test_images is not None  # drawn after an evaluation of them
    query_images, gallery_images = data.test_images[: len(query)], data.test_images[len(query) :]
  else:
    query_images, gallery_images = [r.path for r in query], [r.path for r in gallery]
  image = visualize.rank_list_image(
    query_images,
    [r.identity for r in query],
    [r.camera for r in query],
    gallery_images,
    [r.identity for r in gallery],
    [r.camera for r in gallery],
    distmat,
    query_indices=queries,
    topk=log.ranklist_topk,
  )
  try:
    visualize.save_png(os.path.join(workdir, f"ranklist_{name}.png"), image)
  except StorageError as exc:  # a picture is not worth the run: said, and the run goes on.
    logger.warning("WARNING the rank-list picture was not written: %s", exc)
  return image


def epoch_line(record: dict[str, Any]) -> str:
  """The one log line of an epoch record."""
  times = " ".join(
    f"{k[len('time_') :]} {v:.1f}s" for k, v in record.items() if k.startswith("time_")
  )
  line = (
    f"epoch {record['epoch']:3d} | clusters {record['clusters']:5d} | "
    f"outliers {record['outliers']:6d} | "
  )
  if "cluster_ari" in record:
    line += f"ARI {record['cluster_ari']:.3f} | "
  if "intra_similarity" in record and np.isfinite(record["intra_similarity"]):
    line += f"intra-sim {record['intra_similarity']:.3f} | "
  line += f"loss {record['loss']:.4f} | {times}"
  if "rlcc_num_dissolved" in record:
    line += (
      f" | rlcc dissolved {record['rlcc_num_dissolved']} new {record['rlcc_num_new']} "
      f"max(y~) {record['rlcc_mean_max_target']:.3f} "
      f"argmax!=y {record['rlcc_frac_argmax_changed']:.3f}"
    )
  if "mAP" in record:
    line += f" | mAP {100 * record['mAP']:.1f} rank1 {100 * record['rank1']:.1f}"
  return line


class Reporter:
  """Writes a run's records (see the module docstring).

  Args:
    config: the run's config (``log`` is read; ``seed`` picks the rank-list queries).
    run: the run's folder.
    data: the run's ``RunData`` (rank lists draw its evaluation images).
    start_epoch: the first epoch this process trains; a resumed run drops what an
      interrupted attempt logged from here on, in metrics.jsonl and TensorBoard.
    num_train: train images (the curves plot outliers as a fraction of it).
    enabled: False on every process but the primary one: nothing is written.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    run: Run,
    data: loading.RunData,
    *,
    start_epoch: int,
    num_train: int,
    enabled: bool = True,
  ):
    self.config = config
    self.workdir = run.path
    self.data = data
    self.num_train = num_train
    self.enabled = enabled
    if enabled:
      run.prune_metrics(start_epoch)
    self._metrics = run.metrics_writer(enabled=enabled)
    # The history the curves are drawn from: read once, then kept up to date in memory.
    self._history = run.metrics_lines()[0] if enabled else []
    self._tensorboard = tensorboard_lib.TensorBoardWriter(
      run.file("tensorboard"),
      purge_step=start_epoch + 1 if start_epoch else 0,
      enabled=bool(config.log.tensorboard) and enabled,
    )

  def _write(self, kind: str, record: dict[str, Any]) -> None:
    self._metrics.write(kind, **record)
    self._history.append({"kind": kind, **record})
    self._tensorboard.write_record(kind, **record)

  def _rank_list(self, distmat: np.ndarray | None, *, epochs_done: int, name: str) -> None:
    if distmat is None:
      return
    image = save_rank_list(self.config, self.workdir, self.data, distmat, name=name)
    if image is not None:
      self._tensorboard.image("ranklist", epochs_done, image)

  def initial(self, metrics: dict[str, float], distmat: np.ndarray) -> None:
    """The evaluation of the features before training (``train.eval_initial``)."""
    if not self.enabled:
      return
    self._write("initial", dict(metrics))
    self._rank_list(distmat, epochs_done=0, name="init")
    self._tensorboard.flush()
    logger.info(
      "initial features (before training): mAP %.1f rank1 %.1f",
      100 * metrics["mAP"],
      100 * metrics["rank1"],
    )

  def epoch(self, record: dict[str, Any], distmat: np.ndarray | None = None) -> None:
    """One epoch's record (``record["epoch"]``; ``distmat`` when it was evaluated)."""
    if not self.enabled:
      return
    epoch = int(record["epoch"])
    self._write("epoch", record)
    self._rank_list(distmat, epochs_done=epoch + 1, name=f"epoch{epoch}")
    visualize.save_training_curves(
      os.path.join(self.workdir, "curves.png"), self._history, num_train=self.num_train
    )
    self._tensorboard.flush()
    logger.info(epoch_line(record))

  def close(self) -> None:
    self._tensorboard.close()
