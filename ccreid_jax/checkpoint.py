"""Checkpoints of a run: one orbax ``CheckpointManager`` per workdir.

A checkpoint is written at the end of every epoch under ``<workdir>/checkpoints/<N>``, where
``N = epoch + 1`` is the number of finished epochs (orbax calls it the checkpoint's step; it is
not a count of train steps). It holds two items:

* ``state``: the array tree (params, batch stats, optimizer state, cluster memory,
  pseudo labels, RNG key, step counter), saved with ``StandardSave`` and restored into
  an abstract tree built with ``jax.eval_shape`` (so nothing is allocated twice);
* ``meta``: a small JSON document (epoch, evaluation metrics when the epoch was
  evaluated, the config the run was started with).

The preservation policy keeps the latest checkpoint and the one with the best mAP.
Orbax writes every checkpoint into a temporary folder and renames it when complete,
so a run killed during a save resumes from the previous good checkpoint. A saved
checkpoint whose files were damaged later (truncated, deleted) raises ``CheckpointError``
naming the step and what to do instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

logger = logging.getLogger("ccreid_jax")


class CheckpointError(RuntimeError):
  """A kept checkpoint cannot be read; the message names the checkpoint and the ways out."""


class CheckpointNotFoundError(FileNotFoundError):
  """The checkpoint asked for is not kept (none saved, none evaluated, or not that step)."""


class CheckpointNameError(ValueError):
  """A checkpoint name that is none of the accepted forms."""


# Every form --checkpoint / config.eval.checkpoint accepts ("init" and checkpoint folders are
# handled by train.load_variables before a Checkpointer resolves the rest).
ACCEPTED_NAMES = ("'latest', 'best', 'init' (the initial model), a checkpoint number (the "
                  "epochs it finished), or the path of a checkpoint folder")


def _name_message(which: Any, directory: str, steps: list[int]) -> str:
  kept = f"kept: {', '.join(map(str, steps))}" if steps else "none kept yet"
  example = os.path.join(directory, str(steps[-1] if steps else 1))
  close = difflib.get_close_matches(str(which), ["latest", "best", "init"], n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  looks_like_path = isinstance(which, str) and (os.sep in which or which.startswith("."))
  what = "no such checkpoint folder" if looks_like_path else "not a checkpoint"
  return (f"checkpoint {which!r}: {what}{hint}. Accepted: {ACCEPTED_NAMES}; "
          f"checkpoints in {directory} ({kept}); a checkpoint folder such as {example}.")


def check_name(which: str | int | None, directory: str) -> None:
  """Refuses a checkpoint name of no accepted form before anything is loaded.

  ``which`` may be None (the default checkpoint), "latest", "best", "init", a checkpoint number or
  an existing folder; ``directory`` is the checkpoint folder whose steps the error lists.

  Raises:
    CheckpointNameError: naming every accepted form and the kept checkpoints.
  """
  if which is None or which in ("latest", "best", "init") or os.path.isdir(str(which)):
    return
  try:
    int(which)
  except (TypeError, ValueError):
    steps = []
    if os.path.isdir(directory):
      steps = sorted(int(n) for n in os.listdir(directory)
                     if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
    raise CheckpointNameError(_name_message(which, os.path.abspath(directory), steps)) from None


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning, which every evaluation opens."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  """What ``Checkpointer.restore`` returns."""

  step: int
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
    keep_every: also keep every checkpoint whose step is a multiple of this (a run without an
      evaluation, which has no best checkpoint).
  """

  def __init__(self, directory: str, *, keep_best: bool = True, read_only: bool = False,
               keep_every: int | None = None):
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
          ))
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
          self.directory, options=options, item_names=("state", "meta"))
    finally:
      absl_logger.removeFilter(notice_filter)

  # -- queries -----------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as exc:  # orbax / tensorstore / json raise many types.
      raise self._unreadable(step, exc) from exc
    return dict(restored["meta"])

  def best_step(self) -> int | None:
    """The step with the highest evaluated mAP, or None when no epoch was evaluated.

    A step whose metadata cannot be read is left out (with a warning), so one damaged
    checkpoint does not hide the others.
    """
    best, best_map = None, None
    for step in self.all_steps():
      try:
        meta = self.read_meta(step)
      except CheckpointError as exc:
        logger.warning("%s", exc)
        continue
      value = _map_of(meta)
      if value is not None and (best_map is None or value > best_map):
        best, best_map = step, value
    return best

  def resolve(self, which: str | int) -> int:
    """Turns ``"latest"``, ``"best"`` or a checkpoint number into a kept checkpoint.

    Raises:
      CheckpointNameError: ``which`` is none of these, listing every accepted form and the
        kept checkpoints.
      CheckpointNotFoundError: no checkpoint is kept, none was evaluated (``"best"``) or the
        step is not kept.
    """
    step = None
    if which not in ("latest", "best"):
      try:
        step = int(which)
      except (TypeError, ValueError):
        raise CheckpointNameError(self._name_message(which)) from None
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(
          f"No checkpoint in {self.directory}: train first with "
          "`python -m ccreid_jax.main --config ... --workdir <this workdir>`.")
    if which == "latest":
      return steps[-1]
    if which == "best":
      best = self.best_step()
      if best is None:
        raise CheckpointNotFoundError(
            f"No evaluated checkpoint in {self.directory} (kept: {steps}); "
            "use --checkpoint=latest.")
      return best
    if step not in steps:
      raise CheckpointNotFoundError(
          f"Checkpoint {step} is not kept in {self.directory}; kept: {steps}.")
    return step

  def _name_message(self, which: Any) -> str:
    return _name_message(which, self.directory, self.all_steps())

  # -- save / restore ----------------------------------------------------------------------
  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves asynchronously; ``meta['metrics']['mAP']`` (if present) ranks checkpoints."""
    mean_ap = _map_of(meta)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=None if mean_ap is None else {"mAP": mean_ap},
    )

  def restore(self, which: str | int, abstract_state: PyTree) -> RestoredCheckpoint:
    """Restores into the structure/shapes of ``abstract_state`` (from jax.eval_shape)."""
    step = self.resolve(which)
    abstract_state = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
      )
    except Exception as exc:  # orbax / tensorstore / json raise many types.
      raise self._unreadable(step, exc) from exc
    return RestoredCheckpoint(step=step, state=restored["state"], meta=dict(restored["meta"]))

  def _unreadable(self, step: int, exc: BaseException) -> CheckpointError:
    path = os.path.join(self.directory, str(step))
    others = [s for s in self.all_steps() if s != step]
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    if others:
      instead = (f"evaluate another kept checkpoint with --checkpoint={others[-1]} (kept: {others}); "
                 f"to resume training from checkpoint {others[-1]}, move {path} out of the way; "
                 "or train into a new --workdir.")
    else:
      instead = (f"no other checkpoint is kept; move {path} out of the way to train from scratch, "
                 "or train into a new --workdir.")
    return CheckpointError(
        f"Checkpoint {step} in {self.directory} cannot be read: its files are damaged "
        "(truncated or partly deleted) or were written for another model config "
        f"({type(exc).__name__}: {reason}).\nInstead: {instead}")

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
