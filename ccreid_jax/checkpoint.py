"""Checkpoints of a run: one orbax ``CheckpointManager`` per workdir.

A checkpoint is written at the end of every epoch under ``<workdir>/checkpoints/<N>``, where
``N = epoch + 1`` is the checkpoint's number: the epochs it finished (orbax calls it the
checkpoint's step; it is not a count of optimizer steps). It holds two items:

* ``state``: the array tree (params, batch stats, optimizer state, cluster memory,
  pseudo labels, RNG key, optimizer step counter), saved with ``StandardSave`` and restored into
  an abstract tree built with ``jax.eval_shape`` (so nothing is allocated twice);
* ``meta``: a small JSON document (epoch, evaluation metrics when the epoch was
  evaluated, the config the run was started with).

The preservation policy keeps the latest checkpoint and the one with the best mAP.
Orbax writes every checkpoint into a temporary folder and renames it when complete,
so a run killed during a save resumes from the previous good checkpoint. A saved
checkpoint whose files were damaged later (truncated, deleted) raises ``CheckpointError``
naming the checkpoint and what to do instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from ccreid_jax.errors import storage_error

PyTree = Any

logger = logging.getLogger("ccreid_jax")


class CheckpointError(RuntimeError):
  """A kept checkpoint cannot be read; the message names the checkpoint and the ways out."""


class CheckpointNotFoundError(FileNotFoundError):
  """The checkpoint asked for is not kept (none saved, none evaluated, or not that number)."""


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning, which every evaluation opens."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  """What ``Checkpointer.restore`` returns."""

  number: int
  state: PyTree
  meta: dict[str, Any]


def _map_of(meta: dict[str, Any] | None) -> float | None:
  metrics = (meta or {}).get("metrics")
  if not metrics or "mAP" not in metrics:
    return None
  return float(metrics["mAP"])


class Checkpointer:
  """Saves and restores the training state of one workdir.

  Args:
    directory: folder that holds the numbered checkpoints (created if missing).
    keep_best: also keep the checkpoint with the highest evaluated mAP.
    read_only: open an existing folder for evaluation without creating anything.
    keep_every: also keep every checkpoint whose number is a multiple of this (a run without an
      evaluation, which has no best checkpoint).
  """

  def __init__(
    self,
    directory: str,
    *,
    keep_best: bool = True,
    read_only: bool = False,
    keep_every: int | None = None,
  ):
    self.directory = os.path.abspath(directory)
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=1)]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
    if keep_best:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics["mAP"],
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=True,
      # A read-only manager saves nothing; saying so up front keeps orbax from warning.
      save_interval_steps=0 if read_only else 1,
    )
    absl_logger = logging.getLogger("absl")
    notice_filter = _DropReadOnlyNotice()
    if read_only:
      absl_logger.addFilter(notice_filter)
    try:
      self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta")
      )
    finally:
      absl_logger.removeFilter(notice_filter)

  # -- queries -----------------------------------------------------------------------------
  def numbers(self) -> list[int]:
    """The numbers of the kept checkpoints, in order."""
    return sorted(self._manager.all_steps())

  def latest(self) -> int | None:
    """The number of the newest kept checkpoint, or None."""
    return self._manager.latest_step()

  def read_meta(self, number: int) -> dict[str, Any]:
    """The metadata saved with checkpoint ``number``."""
    try:
      restored = self._manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as exc:  # orbax / tensorstore / json raise many types
      raise self._unreadable(number, exc) from exc
    return dict(restored["meta"])

  def best(self) -> int | None:
    """The checkpoint with the highest evaluated mAP, or None when no epoch was evaluated.

    A checkpoint whose metadata cannot be read is left out (with a warning), so one damaged
    checkpoint does not hide the others.
    """
    best, best_map = None, None
    for number in self.numbers():
      try:
        meta = self.read_meta(number)
      except CheckpointError as exc:
        logger.warning("%s", exc)
        continue
      value = _map_of(meta)
      if value is not None and (best_map is None or value > best_map):
        best, best_map = number, value
    return best

  # -- save / restore ----------------------------------------------------------------------
  def save(self, number: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves checkpoint ``number`` asynchronously; ``meta['metrics']['mAP']`` (if present)
    ranks checkpoints."""
    mean_ap = _map_of(meta)
    with self._storage_errors(f"checkpoint {number}"):
      self._manager.save(
        number,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=None if mean_ap is None else {"mAP": mean_ap},
      )

  @contextlib.contextmanager
  def _storage_errors(self, what: str) -> Iterator[None]:
    """A save the storage refused (orbax's traceback around an ``OSError``) as one
    ``StorageError`` line: the folder, the cause, and that the saved checkpoints are intact."""
    try:
      yield
    except Exception as exc:  # orbax wraps the OSError of its writing threads.
      kept = self.numbers()
      advice = (
        (
          f"The checkpoints saved before it ({', '.join(map(str, kept))}) are intact: "
          if kept
          else "No checkpoint was saved before it: "
        )
        + "free some space there (or make the folder writable) and run the same command "
        "again to resume" + (f" from checkpoint {kept[-1]}." if kept else ".")
      )
      error = storage_error(exc, self.directory, f"{what} into", advice=advice)
      if error is None:
        raise
      raise error from None

  def restore(self, number: int, abstract_state: PyTree) -> RestoredCheckpoint:
    """Restores checkpoint ``number`` into the structure / shapes of ``abstract_state`` (from
    ``jax.eval_shape``)."""
    abstract_state = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self._manager.restore(
        number,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as exc:  # orbax / tensorstore / json raise many types
      raise self._unreadable(number, exc) from exc
    return RestoredCheckpoint(number=number, state=restored["state"], meta=dict(restored["meta"]))

  def _unreadable(self, number: int, exc: BaseException) -> CheckpointError:
    path = os.path.join(self.directory, str(number))
    others = [n for n in self.numbers() if n != number]
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    if others:
      instead = (
        f"evaluate another kept checkpoint with --checkpoint={others[-1]} (kept: "
        f"{others}); to resume training from checkpoint {others[-1]}, move {path} out "
        "of the way; or train into a new --workdir."
      )
    else:
      instead = (
        f"no other checkpoint is kept; move {path} out of the way to train from "
        "scratch, or train into a new --workdir."
      )
    return CheckpointError(
      f"Checkpoint {number} in {self.directory} cannot be read: its files are damaged "
      "(truncated or partly deleted) or were written for another model config "
      f"({type(exc).__name__}: {reason}).\nInstead: {instead}"
    )

  def wait_until_finished(self) -> None:
    with self._storage_errors("a checkpoint"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
