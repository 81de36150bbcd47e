"""What a workdir holds besides checkpoints: the run's config and its metrics history.

* ``check_workdir_config`` saves the config with the run and, when the run is resumed,
  refuses a config that would change the results (``WorkdirConfigMismatch``).
* ``read_epoch_records`` reads ``metrics.jsonl`` the way a crashed-and-resumed run needs:
  the last record of each epoch wins, a torn last line is ignored.
* ``prune_metrics`` drops the records a resumed run is about to write again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
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
    "upgrade_saved_config",
    "has_checkpoints",
    "prune_metrics",
    "read_epoch_records",
    "read_metrics_lines",
    "save_workdir_config",
    "LOCK_FILE",
    "MODEL_FIELDS",
    "WorkdirLocked",
    "lock_workdir",
    "with_run_model_settings",
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
    "data.follow_symlinks_outside",  # with it off, any outside link stops the run.
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


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (``config.json``) in today's fields: a copy, old fields rewritten.

  The one place that maps fields of older runs (``validation.REPLACED_FIELDS``) to their
  replacements: ``memory.hard`` (bool) becomes ``memory.update_rule``, False -> "momentum" and
  True -> "hard".
  """
  memory = saved.get("memory")
  if not isinstance(memory, dict) or "hard" not in memory:
    return saved
  memory = dict(memory)
  hard = memory.pop("hard")
  memory.setdefault("update_rule", "hard" if hard else "momentum")
  return {**saved, "memory": memory}


def config_differences(old: dict[str, Any], new: Any,
                       reference: Any = None) -> list[tuple[str, Any, Any]]:
  """``(field, old, new)`` for every result-changing field that differs, sorted by field.

  A field missing from ``old`` (a run saved before the field existed) counts as its default
  in ``reference`` (``configs/default.py`` when None), since new fields default to the old
  behaviour; a replaced field is first rewritten by :func:`upgrade_saved_config`.
  """
  if reference is None:
    reference = validation.default_config()
  defaults = _flatten(_as_plain(reference)) if reference is not None else {}
  old_flat, new_flat = _flatten(upgrade_saved_config(old)), _flatten(_as_plain(new))
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
                         reference: Any = None, write: bool = True) -> list[tuple[str, Any, Any]]:
  """Checks ``config`` against ``<workdir>/config.json``; saves it unless ``write=False``.

  The comparison happens only when the workdir already holds a checkpoint (a run to
  resume); a workdir without one simply gets the new config. Fields in
  ``RESULT_NEUTRAL_FIELDS`` (logging, evaluation, the number of epochs, data locations)
  may change freely. With ``force`` the differences are returned (and, when writing, the
  old file is kept as ``config.replaced-<n>.json`` and the new config saved).

  ``write=False`` only checks: a training run saves the config with ``save_workdir_config``
  once it knows the checkpoint can be resumed with it, and the other processes of a
  multi-process run never write.

  Returns:
    The differing fields ``(field, old, new)`` (empty unless ``force``).

  Raises:
    WorkdirConfigMismatch: listing each differing field ``old -> new`` (without ``force``).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(
        f"--workdir {workdir!r} is a file, not a folder: pass a folder (it is created when "
        "missing)")
  path = os.path.join(workdir, CONFIG_FILE)
  differences: list[tuple[str, Any, Any]] = []
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
  if write:
    save_workdir_config(workdir, config, differences)
  return differences


def save_workdir_config(workdir: str, config: Any,
                        differences: list[tuple[str, Any, Any]] = ()) -> None:
  """Writes ``<workdir>/config.json``; with ``differences`` (``--force``) the old file is
  first kept as ``config.replaced-<n>.json``."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if differences and os.path.exists(path):
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.replaced-{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.replaced-{n}.json"))
    logger.warning("--force: resuming %s with a different config (%s); the old config is "
                   "kept as config.replaced-%d.json", workdir,
                   ", ".join(f"{p}: {a!r} -> {b!r}" for p, a, b in differences), n)
  text = (config.to_json_best_effort(indent=2) if isinstance(config, ml_collections.ConfigDict)
          else json.dumps(config, indent=2, default=repr))
  write_atomic(path, text)


# Fields that change the model a checkpoint holds, or the input it expects: evaluation and
# extraction take them from the run's saved config.
MODEL_FIELDS: tuple[str, ...] = (
    "model.arch", "model.depth", "model.width", "model.last_stride", "model.pooling",
    "model.dtype", "data.height", "data.width")


def with_run_model_settings(config: ml_collections.ConfigDict,
                            workdir: str) -> ml_collections.ConfigDict:
  """``config`` with the ``MODEL_FIELDS`` of the run saved in ``workdir`` (a copy).

  Evaluating a checkpoint with another depth, pooling, image size or dtype would score
  another model (or fail to restore): the run's own values are used, and each replaced
  value is logged. Without a saved config the given one is returned unchanged.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError):
    return config
  config = config.copy_and_resolve_references()
  for field in MODEL_FIELDS:
    group, name = field.split(".")
    if field not in saved or saved[field] == config[group][name]:
      continue
    logger.warning("%s: using the run's %s=%r from %s (the given config says %r)", workdir,
                   field, saved[field], path, config[group][name])
    config[group][name] = saved[field]
  return config


# ---------------------------------------------------------------------------------------
# One training run at a time.
# ---------------------------------------------------------------------------------------

LOCK_FILE = "train.lock"


class WorkdirLocked(RuntimeError):
  """Another training run holds the workdir."""


def _lock_holder(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")
  except (OSError, ValueError):
    return "another process"


@contextlib.contextmanager
def lock_workdir(workdir: str, *, enabled: bool = True):
  """Holds an exclusive lock on ``workdir`` for one training run.

  The lock is an ``flock`` on ``<workdir>/train.lock``, which also records the holder's
  process id, host and start time. The operating system releases it when the process ends,
  however it ends, so the file left by a killed run is no obstacle. ``enabled=False`` (the
  other processes of a multi-process run) takes no lock.

  Raises:
    WorkdirLocked: naming the process and host that hold the workdir.
  """
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLocked(
          f"{workdir} is in use by another training run ({_lock_holder(path)}). Wait for it "
          "to finish or stop it, or train into another --workdir.") from None
    except OSError as exc:  # a file system without locks: run unprotected, but say so.
      logger.warning("could not lock %s (%s): make sure no other run uses this workdir",
                     path, exc)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock


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
