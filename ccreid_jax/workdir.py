"""What a workdir holds besides checkpoints: the run's config and its metrics history.

* ``check_workdir_config`` saves the config with the run and, when the run is resumed,
  refuses a config that would change the results (``WorkdirConfigMismatch``).
* ``read_epoch_records`` reads ``metrics.jsonl`` the way a crashed-and-resumed run needs:
  the last record of each epoch wins, a torn last line is ignored.
* ``prune_metrics`` drops the records a resumed run is about to write again.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections

from ccreid_jax import validation
from ccreid_jax.utils import write_atomic

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "RESULT_NEUTRAL_FIELDS",
    "WorkdirConfigMismatch",
    "check_workdir_config",
    "config_differences",
    "has_checkpoints",
    "prune_metrics",
    "read_epoch_records",
    "read_metrics_lines",
]

logger = logging.getLogger("ccreid_jax")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

# Fields that may change between a run and its resumption: they do not change what is
# trained. A field ending in "." names a whole group. ``data.skip_bad_*`` are neutral because
# with them off any bad file stops the run, so toggling them cannot silently change the data.
RESULT_NEUTRAL_FIELDS: tuple[str, ...] = (
    "log.",
    "eval.",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.eval_initial",
    "data.source",  # the same images from a TFDS build or the folder it was built from.
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "data.skip_bad_names",
    "data.skip_bad_images",
)

_ABSENT = "<absent>"


class WorkdirConfigMismatch(ValueError):
  """A workdir's saved config and the new one differ in fields that change the results."""

  def __init__(self, workdir: str, differences: list[tuple[str, Any, Any]]):
    self.differences = list(differences)
    lines = [f"  {path}: {old!r} -> {new!r}" for path, old, new in self.differences]
    super().__init__(
        f"The config differs from the one saved in {os.path.join(workdir, CONFIG_FILE)} in "
        f"{len(lines)} field(s) that change the results:\n" + "\n".join(lines) +
        "\nResuming would mix two different runs. Pass --force to resume with the new config "
        "anyway, or start a new run with another --workdir.")


# ---------------------------------------------------------------------------------------
# The saved config.
# ---------------------------------------------------------------------------------------


def has_checkpoints(workdir: str) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a finished (numbered) checkpoint folder."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return False
  return any(name.isdigit() and os.path.isdir(os.path.join(folder, name))
             for name in os.listdir(folder))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def _as_plain(config: Any) -> dict[str, Any]:
  """The config as the JSON ``config.json`` holds (tuples become lists, and so on)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def _neutral(path: str) -> bool:
  return any(path.startswith(f) if f.endswith(".") else path == f
             for f in RESULT_NEUTRAL_FIELDS)


def config_differences(old: dict[str, Any], new: Any,
                       reference: Any = None) -> list[tuple[str, Any, Any]]:
  """``(field, old, new)`` for every result-changing field that differs, sorted by field.

  A field missing from ``old`` (a run saved before the field existed) counts as its default
  in ``reference`` (``configs/default.py`` when None), since new fields default to the old
  behaviour.
  """
  if reference is None:
    reference = validation.default_config()
  defaults = _flatten(_as_plain(reference)) if reference is not None else {}
  old_flat, new_flat = _flatten(old), _flatten(_as_plain(new))
  out = []
  for path in sorted(set(old_flat) | set(new_flat)):
    if _neutral(path):
      continue
    before = old_flat.get(path, defaults.get(path, _ABSENT))
    after = new_flat.get(path, _ABSENT)
    if before != after:
      out.append((path, before, after))
  return out


def check_workdir_config(workdir: str, config: Any, *, force: bool,
                         reference: Any = None, write: bool = True) -> None:
  """Saves ``config`` as ``<workdir>/config.json``, refusing one that changes a resumed run.

  The comparison happens only when the workdir already holds a checkpoint (a run to
  resume); a workdir without one simply gets the new config. Fields in
  ``RESULT_NEUTRAL_FIELDS`` (logging, evaluation, the number of epochs, data locations)
  may change freely. With ``force`` the mismatch is logged, the old file is kept as
  ``config.replaced-<n>.json`` and the new config is saved.

  ``write=False`` (the other processes of a multi-process run) only checks: process 0
  renames and writes the files.

  Raises:
    WorkdirConfigMismatch: listing each differing field ``old -> new``.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) and has_checkpoints(workdir):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as exc:
      differences = [("config.json", f"unreadable ({exc})", "this config")]
    else:
      differences = config_differences(old, config, reference)
    if differences and not force:
      raise WorkdirConfigMismatch(workdir, differences)
    if differences and write:
      n = 1
      while os.path.exists(os.path.join(workdir, f"config.replaced-{n}.json")):
        n += 1
      os.replace(path, os.path.join(workdir, f"config.replaced-{n}.json"))
      logger.warning("--force: resuming %s with a different config (%s); the old config is "
                     "kept as config.replaced-%d.json", workdir,
                     ", ".join(f"{p}: {a!r} -> {b!r}" for p, a, b in differences), n)
  if not write:
    return
  text = (config.to_json_best_effort(indent=2) if isinstance(config, ml_collections.ConfigDict)
          else json.dumps(config, indent=2, default=repr))
  write_atomic(path, text)


# ---------------------------------------------------------------------------------------
# The metrics history.
# ---------------------------------------------------------------------------------------


def read_metrics_lines(workdir: str) -> tuple[list[dict[str, Any]], int]:
  """``(records, num_bad_lines)`` of ``<workdir>/metrics.jsonl``.

  A line that is not a JSON object (the torn tail of a run killed while writing) is
  skipped and counted instead of failing the whole read.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return [], 0
  records, bad = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record, torn = _parse_line(line)
      bad += torn
      if record is not None:
        records.append(record)
  return records, bad


def _parse_whole(line: str) -> Any:
  try:
    return json.loads(line)
  except ValueError:
    return None


def _parse_line(line: str) -> tuple[dict[str, Any] | None, bool]:
  """``(record, torn)`` of one line.

  A record torn by a kill and then continued by the next append reads as its whole tail
  record (``torn`` is True: the torn part is lost); a line with no whole record gives None.
  """
  whole = _parse_whole(line)
  if isinstance(whole, dict):
    return whole, False
  start = line.find('{"', 1)
  while start != -1:
    tail = _parse_whole(line[start:])
    if isinstance(tail, dict):
      return tail, True
    start = line.find('{"', start + 1)
  return None, True


def read_epoch_records(workdir: str) -> list[dict[str, Any]]:
  """One record per epoch, sorted by epoch: the LAST record written for each epoch.

  A run killed after logging epoch ``e`` but before its checkpoint was saved logs epoch
  ``e`` again when resumed; the later record is the one the finished run stands on.
  """
  by_epoch: dict[int, dict[str, Any]] = {}
  for record in read_metrics_lines(workdir)[0]:
    if record.get("kind") == "epoch" and "epoch" in record:
      by_epoch[int(record["epoch"])] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


def prune_metrics(workdir: str, start_epoch: int) -> int:
  """Drops the records a run resuming at ``start_epoch`` will write again; returns how many.

  Removes ``epoch`` records with ``epoch >= start_epoch``, the ``initial`` record when
  ``start_epoch == 0`` and torn lines, so ``metrics.jsonl`` keeps one record per epoch. The
  file is rewritten atomically; nothing is rewritten when nothing is dropped.
  """
  path = os.path.join(workdir, METRICS_FILE)
  records, bad = read_metrics_lines(workdir)

  def stale(record: dict[str, Any]) -> bool:
    if record.get("kind") == "epoch":
      return int(record.get("epoch", -1)) >= start_epoch
    return record.get("kind") == "initial" and start_epoch == 0

  kept = [r for r in records if not stale(r)]
  dropped = len(records) - len(kept) + bad
  if dropped:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    logger.info("metrics.jsonl: dropped %d record(s) of the interrupted attempt "
                "(epochs >= %d are redone)", dropped, start_epoch)
  return dropped
