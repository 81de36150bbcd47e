"""The run folder: one object owns everything a workdir holds.

``Run(workdir)`` owns

* ``config.json``: the config the run was started with (``read_config``, ``check_config``,
  ``save_config``), and the model settings that evaluation takes from it
  (``model_config``);
* ``train.lock``: one training run at a time (``lock``);
* ``metrics.jsonl``: the history of epochs (``metrics_writer``, ``metrics_lines``,
  ``epoch_records``, ``prune_metrics``);
* ``checkpoints/``: the orbax manager (``checkpointer``), the names that point at a
  checkpoint (``reference``, ``resolve``: "best" | "latest" | "init" | a number | a checkpoint
  folder, into a ``Checkpoint`` with its number, epoch and run), and the model of a checkpoint
  (``load_model``, ``restore``);
* what else a run writes there (``tensorboard/``, ``cache/``, the pictures, ``eval_*.json``):
  ``owns`` says whether a path is one of the run's own files, which nothing else may write.

A checkpoint is named by its number, the epochs it finished (checkpoint ``N`` holds the state
after epoch ``N - 1``; the initial model is checkpoint 0). A step is one optimizer update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import fnmatch
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import distributed, models, validation
from ccreid_jax import state as state_lib
from ccreid_jax.errors import storage_error
from ccreid_jax.pseudo_labels import Generation
from ccreid_jax.utils import write_atomic

__all__ = [
  "ACCEPTED_NAMES",
  "CHECKPOINTS_FOLDER",
  "CONFIG_FILE",
  "LOCK_FILE",
  "METRICS_FILE",
  "MODEL_FIELDS",
  "RESULT_NEUTRAL_FIELDS",
  "Checkpoint",
  "CheckpointNameError",
  "CheckpointRef",
  "LoadedModel",
  "MetricsWriter",
  "Run",
  "RunConfigError",
  "WorkdirConfigMismatch",
  "WorkdirLocked",
  "config_differences",
  "upgrade_saved_config",
]

logger = logging.getLogger("ccreid_jax")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"
CHECKPOINTS_FOLDER = "checkpoints"
# What a run writes into its folder besides the above (``Run.owns``): folders, then file
# names (``fnmatch`` patterns) of the reports, evaluations and default outputs.
_OWN_FOLDERS = (CHECKPOINTS_FOLDER, "tensorboard", "cache")
_OWN_FILES = (
  CONFIG_FILE,
  METRICS_FILE,
  LOCK_FILE,
  "config.replaced-*.json",
  "curves.png",
  "ranklist_*.png",
  "eval_*.json",
  "eps_sweep_*.json",
  "eps_sweep_*.png",
  "search_ranklist.png",
)
# The groups every saved run config has (a JSON file without them is something else).
_RUN_CONFIG_GROUPS = ("data", "model", "train")

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

# Fields that change the model a checkpoint holds, or the input it expects: evaluation and
# extraction take them from the run's saved config.
MODEL_FIELDS: tuple[str, ...] = (
  "model.arch",
  "model.depth",
  "model.width",
  "model.last_stride",
  "model.pooling",
  "model.dtype",
  "data.height",
  "data.width",
)

# Every form --checkpoint / config.eval.checkpoint accepts.
ACCEPTED_NAMES = (
  "'latest', 'best', 'init' (the initial model), a checkpoint number (the "
  "epochs it finished), or the path of a checkpoint folder"
)
_WORDS = ("latest", "best", "init")
_ABSENT = "<absent>"


class WorkdirConfigMismatch(ValueError):
  """A workdir's saved config and the new one differ in fields that change the results."""

  def __init__(self, workdir: str, differences: list[tuple[str, Any, Any]]):
    self.differences = list(differences)
    lines = [f"  {path}: {old!r} -> {new!r}" for path, old, new in self.differences]
    super().__init__(
      f"The config differs from the one saved in {os.path.join(workdir, CONFIG_FILE)} in "
      f"{len(lines)} field(s) that change the results:\n"
      + "\n".join(lines)
      + "\nResuming would mix two different runs. Pass --force to resume with the new config "
      "anyway, or start a new run with another --workdir."
    )


class WorkdirLocked(RuntimeError):
  """Another training run holds the workdir."""


class RunConfigError(ValueError):
  """A run's ``config.json`` that cannot be used: not JSON, or not a run's config (e.g. an
  export's sidecar written over it)."""


class CheckpointNameError(ValueError):
  """A checkpoint name that is none of the accepted forms."""


# ---------------------------------------------------------------------------------------
# Checkpoint names.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """A checkpoint as a user names it, before it is looked up.

  Attributes:
    kind: "best", "latest", "init" (the initial model), "number" or "folder".
    number: the checkpoint number (kind "number": the epochs it finished).
    folder: the absolute path of a checkpoint folder, ``<run>/checkpoints/<N>`` (kind
      "folder").
  """

  kind: str
  number: int | None = None
  folder: str | None = None

  @classmethod
  def parse(
    cls, value: str | int | CheckpointRef, checkpoints_dir: str | None = None
  ) -> CheckpointRef:
    """The reference ``value`` names: a word, an existing folder, or a number.

    Raises:
      CheckpointNameError: ``value`` is none of these; the message lists every accepted form
        and, with ``checkpoints_dir``, the checkpoints kept there.
    """
    if isinstance(value, CheckpointRef):
      return value
    if value in _WORDS:
      return cls(kind=str(value))
    if isinstance(value, str) and os.path.isdir(value):
      return cls(kind="folder", folder=os.path.abspath(value))
    try:
      return cls(kind="number", number=int(value))
    except (TypeError, ValueError):
      raise CheckpointNameError(_name_message(value, checkpoints_dir)) from None

  def __str__(self) -> str:
    if self.kind == "number":
      return str(self.number)
    if self.kind == "folder":
      return str(self.folder)
    return self.kind


def _kept_numbers(checkpoints_dir: str | None) -> list[int]:
  if not checkpoints_dir or not os.path.isdir(checkpoints_dir):
    return []
  return sorted(
    int(n)
    for n in os.listdir(checkpoints_dir)
    if n.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, n))
  )


def _name_message(value: Any, checkpoints_dir: str | None) -> str:
  directory = os.path.abspath(checkpoints_dir or CHECKPOINTS_FOLDER)
  numbers = _kept_numbers(checkpoints_dir)
  kept = f"kept: {', '.join(map(str, numbers))}" if numbers else "none kept yet"
  example = os.path.join(directory, str(numbers[-1] if numbers else 1))
  close = difflib.get_close_matches(str(value), list(_WORDS), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  looks_like_path = isinstance(value, str) and (os.sep in value or value.startswith("."))
  what = "no such checkpoint folder" if looks_like_path else "not a checkpoint"
  return (
    f"checkpoint {value!r}: {what}{hint}. Accepted: {ACCEPTED_NAMES}; "
    f"checkpoints in {directory} ({kept}); a checkpoint folder such as {example}."
  )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint looked up: which run holds it, its number and its last epoch.

  Attributes:
    run: the run folder that holds it (another run's for a checkpoint folder).
    number: the epochs it finished; 0 for the initial model.
    epoch: the last epoch it finished; -1 for the initial model.
    name: how it was chosen: "best", "latest", "init", the number, or the folder given.
  """

  run: Run
  number: int
  epoch: int
  name: str

  @property
  def is_initial(self) -> bool:
    return self.number == 0

  @property
  def label(self) -> str:
    """ "init" or the number: how file names (``eval_<label>.json``) name it."""
    return "init" if self.is_initial else str(self.number)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """The model of a checkpoint: the flax module, its variables (replicated) and the
  checkpoint they came from."""

  model: models.ReIDResNet
  variables: Any
  checkpoint: Checkpoint


# ---------------------------------------------------------------------------------------
# The saved config.
# ---------------------------------------------------------------------------------------


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
  return any(path.startswith(f) if f.endswith(".") else path == f for f in RESULT_NEUTRAL_FIELDS)


def _overlay(base: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _overlay(out[key], value)
    else:
      out[key] = value
  return out


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


def config_differences(
  old: dict[str, Any], new: Any, reference: Any = None
) -> list[tuple[str, Any, Any]]:
  """``(field, old, new)`` for every result-changing field that differs, sorted by field.

  A field missing from ``old`` (a run saved before the field existed) counts as its default
  in ``reference`` (the package's default config when None), since new fields default to the
  old behaviour; a replaced field is first rewritten by ``upgrade_saved_config``.
  """
  if reference is None:
    reference = validation.default_config()
  defaults = _flatten(_as_plain(reference))
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


class MetricsWriter:
  """Appends one JSON object per line to a run's ``metrics.jsonl``.

  ``enabled=False`` (every process but process 0 of a multi-process run) writes nothing.
  """

  def __init__(self, path: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = path
    if enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, kind: str, **values: Any) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "time": time.time(), **values}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
    except OSError as exc:
      error = storage_error(exc, self.path)
      if error is None:
        raise
      raise error from exc


def _parse_whole(line: str) -> Any:
  try:
    return json.loads(line)
  except ValueError:
    return None


def _parse_line(line: str) -> tuple[dict[str, Any] | None, bool]:
  """``(record, torn)`` of one line of ``metrics.jsonl``.

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


def _not_a_run_config(path: str, saved: Any) -> str | None:
  """Why ``saved``, the JSON value of ``path``, is not a run's config; None when it is one."""
  if not isinstance(saved, dict):
    return f"{path} does not hold a JSON object (a run's config)."
  missing = [g for g in _RUN_CONFIG_GROUPS if not isinstance(saved.get(g), dict)]
  if not missing:
    return None
  keys = sorted(map(str, saved))
  shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
  sidecar = ""
  if "format" in saved and "file" in saved:
    sidecar = (
      f" It looks like the sidecar of a {saved['format']!r} export of "
      f"{saved['file']!r}, written over the run's config."
    )
  return (
    f"{path} is not the config of a ccreid_jax run: it has no "
    f"{' / '.join(repr(g) for g in missing)} group (its keys: {shown}).{sidecar} The "
    "run's model settings (depth, image size, dtype, ...) are not known from it: put "
    "the run's config.json back (a config.replaced-<n>.json there is an older one), or "
    "use another --workdir."
  )


def _lock_holder(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return (
      f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
      f"{holder.get('started', '?')}"
    )
  except (OSError, ValueError):
    return "another process"


# ---------------------------------------------------------------------------------------
# The run folder.
# ---------------------------------------------------------------------------------------


class Run:
  """The folder of one run (``--workdir``) and everything in it.

  Args:
    path: the run's folder (created only by what writes into it).
    checkpoints_dir: where its checkpoints are (default ``<path>/checkpoints``).
  """

  def __init__(self, path: str, *, checkpoints_dir: str | None = None):
    self.path = str(path)
    self.checkpoints_dir = os.path.abspath(
      checkpoints_dir or os.path.join(self.path, CHECKPOINTS_FOLDER)
    )
    self._reader: checkpoint_lib.Checkpointer | None = None

  def __repr__(self) -> str:
    return f"Run({self.path!r})"

  def file(self, name: str) -> str:
    """The path of ``name`` inside the run folder."""
    return os.path.join(self.path, name)

  @property
  def config_path(self) -> str:
    return self.file(CONFIG_FILE)

  @property
  def metrics_path(self) -> str:
    return self.file(METRICS_FILE)

  def owns(self, path: str) -> bool:
    """Whether ``path`` is one of the files this run writes (``config.json``,
    ``metrics.jsonl``, ``train.lock``, ``checkpoints/``, ``tensorboard/``, ``cache/``,
    ``eval_*.json``, the pictures, ...) or lies in one of its folders; links are followed.
    Nothing but the run itself may write them (an export, for one, is refused)."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(self.path))
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
      return False
    first, _, rest = rel.partition(os.sep)
    if first in _OWN_FOLDERS:
      return True
    return not rest and any(fnmatch.fnmatchcase(first, p) for p in _OWN_FILES)

  def _saved_config(self) -> dict[str, Any] | None:
    """The JSON object of ``config.json``, or None when there is no such file.

    Raises:
      RunConfigError: the file is not JSON, or not a run's config.
    """
    path = self.config_path
    try:
      with open(path) as f:
        saved = json.load(f)
    except FileNotFoundError:
      return None
    except ValueError as exc:
      raise RunConfigError(f"{path} is not valid JSON: {exc}") from exc
    problem = _not_a_run_config(path, saved)
    if problem is not None:
      raise RunConfigError(problem)
    return saved

  # -- config.json ------------------------------------------------------------------------
  def read_config(self) -> ml_collections.ConfigDict:
    """The config the run saved in ``config.json``; fields it lacks (a run saved before they
    existed) take their default values.

    Raises:
      FileNotFoundError: no ``config.json``.
      RunConfigError: the file is not JSON, or not a run's config (an export's sidecar, say).
    """
    path = self.config_path
    saved = self._saved_config() if os.path.isfile(path) else None
    if saved is None:
      raise FileNotFoundError(
        f"{path} does not exist: {self.path!r} is not the folder of a "
        "ccreid_jax run (train one with --mode train --workdir ...)."
      )
    defaults = validation.default_config()
    saved = _overlay(json.loads(defaults.to_json_best_effort()), upgrade_saved_config(saved))
    return ml_collections.ConfigDict(saved)

  def check_config(
    self, config: Any, *, force: bool, reference: Any = None, write: bool = True
  ) -> list[tuple[str, Any, Any]]:
    """Checks ``config`` against ``config.json``; saves it unless ``write=False``.

    The comparison happens only when the run already holds a checkpoint (a run to resume);
    a folder without one simply gets the new config. Fields in ``RESULT_NEUTRAL_FIELDS``
    (logging, evaluation, the number of epochs, data locations) may change freely. With
    ``force`` the differences are returned (and, when writing, the old file is kept as
    ``config.replaced-<n>.json`` and the new config saved).

    ``write=False`` only checks: a training run saves the config with ``save_config`` once it
    knows the checkpoint can be resumed with it, and the other processes of a multi-process
    run never write.

    Returns:
      The differing fields ``(field, old, new)`` (empty unless ``force``).

    Raises:
      WorkdirConfigMismatch: listing each differing field ``old -> new`` (without ``force``).
    """
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise NotADirectoryError(
        f"--workdir {self.path!r} is a file, not a folder: pass a folder (it is created when "
        "missing)"
      )
    differences: list[tuple[str, Any, Any]] = []
    if os.path.exists(self.config_path) and self.has_checkpoints():
      try:
        with open(self.config_path) as f:
          old = json.load(f)
      except (OSError, ValueError) as exc:
        differences = [("config.json", f"unreadable ({exc})", "this config")]
      else:
        problem = _not_a_run_config(self.config_path, old)
        differences = (
          [("config.json", f"not a run's config: {problem}", "this config")]
          if problem
          else config_differences(old, config, reference)
        )
      if differences and not force:
        raise WorkdirConfigMismatch(self.path, differences)
    if write:
      self.save_config(config, differences)
    return differences

  def save_config(self, config: Any, differences: Sequence[tuple[str, Any, Any]] = ()) -> None:
    """Writes ``config.json``; with ``differences`` (``--force``) the old file is first kept
    as ``config.replaced-<n>.json``."""
    os.makedirs(self.path, exist_ok=True)
    if differences and os.path.exists(self.config_path):
      n = 1
      while os.path.exists(self.file(f"config.replaced-{n}.json")):
        n += 1
      os.replace(self.config_path, self.file(f"config.replaced-{n}.json"))
      logger.warning(
        "--force: resuming %s with a different config (%s); the old config is "
        "kept as config.replaced-%d.json",
        self.path,
        ", ".join(f"{p}: {a!r} -> {b!r}" for p, a, b in differences),
        n,
      )
    text = (
      config.to_json_best_effort(indent=2)
      if isinstance(config, ml_collections.ConfigDict)
      else json.dumps(config, indent=2, default=repr)
    )
    write_atomic(self.config_path, text)

  def with_model_settings(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the ``MODEL_FIELDS`` this run saved (a copy).

    Evaluating a checkpoint with another depth, pooling, image size or dtype would score
    another model (or fail to restore): the run's own values are used, and each replaced
    value is logged. Without a saved config the given one is returned unchanged.

    Raises:
      RunConfigError: ``config.json`` is not JSON or not a run's config (an export's sidecar
        written over it, say): its model settings are not known.
    """
    saved = self._saved_config()
    if saved is None:
      return config
    saved = _flatten(saved)
    config = config.copy_and_resolve_references()
    for field in MODEL_FIELDS:
      group, name = field.split(".")
      if field not in saved or saved[field] == config[group][name]:
        continue
      logger.warning(
        "%s: using the run's %s=%r from %s (the given config says %r)",
        self.path,
        field,
        saved[field],
        self.config_path,
        config[group][name],
      )
      config[group][name] = saved[field]
    return config

  # -- train.lock -------------------------------------------------------------------------
  @contextlib.contextmanager
  def lock(self, *, enabled: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on the run for one training run.

    The lock is an ``flock`` on ``train.lock``, which also records the holder's process id,
    host and start time. The operating system releases it when the process ends, however it
    ends, so the file left by a killed run is no obstacle. ``enabled=False`` (the other
    processes of a multi-process run) takes no lock.

    Raises:
      WorkdirLocked: naming the process and host that hold the run.
    """
    if not enabled:
      yield
      return
    os.makedirs(self.path, exist_ok=True)
    path = self.file(LOCK_FILE)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole run: the lock)
    try:
      try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise WorkdirLocked(
          f"{self.path} is in use by another training run ({_lock_holder(path)}). Wait for "
          "it to finish or stop it, or train into another --workdir."
        ) from None
      except OSError as exc:  # a file system without locks: run unprotected, but say so.
        logger.warning(
          "could not lock %s (%s): make sure no other run uses this workdir", path, exc
        )
      handle.seek(0)
      handle.truncate()
      handle.write(
        json.dumps(
          {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          }
        )
      )
      handle.flush()
      yield
    finally:
      handle.close()  # releases the lock

  # -- metrics.jsonl ----------------------------------------------------------------------
  def metrics_writer(self, *, enabled: bool = True) -> MetricsWriter:
    return MetricsWriter(self.metrics_path, enabled=enabled)

  def metrics_lines(self) -> tuple[list[dict[str, Any]], int]:
    """``(records, num_bad_lines)`` of ``metrics.jsonl``.

    A line that is not a JSON object (the torn tail of a run killed while writing) is
    skipped and counted instead of failing the whole read.
    """
    if not os.path.exists(self.metrics_path):
      return [], 0
    records, bad = [], 0
    with open(self.metrics_path) as f:
      for line in f:
        if not line.strip():
          continue
        record, torn = _parse_line(line)
        bad += torn
        if record is not None:
          records.append(record)
    return records, bad

  def epoch_records(self) -> list[dict[str, Any]]:
    """One record per epoch, sorted by epoch: the LAST record written for each epoch.

    A run killed after logging epoch ``e`` but before its checkpoint was saved logs epoch
    ``e`` again when resumed; the later record is the one the finished run stands on.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in self.metrics_lines()[0]:
      if record.get("kind") == "epoch" and "epoch" in record:
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]

  def prune_metrics(self, start_epoch: int) -> int:
    """Drops the records a run resuming at ``start_epoch`` will write again; returns how many.

    Removes ``epoch`` records with ``epoch >= start_epoch``, the ``initial`` record when
    ``start_epoch == 0`` and torn lines, so ``metrics.jsonl`` keeps one record per epoch. The
    file is rewritten atomically; nothing is rewritten when nothing is dropped.
    """
    records, bad = self.metrics_lines()

    def stale(record: dict[str, Any]) -> bool:
      if record.get("kind") == "epoch":
        return int(record.get("epoch", -1)) >= start_epoch
      return record.get("kind") == "initial" and start_epoch == 0

    kept = [r for r in records if not stale(r)]
    dropped = len(records) - len(kept) + bad
    if dropped:
      write_atomic(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
      logger.info(
        "metrics.jsonl: dropped %d record(s) of the interrupted attempt (epochs >= %d are redone)",
        dropped,
        start_epoch,
      )
    return dropped

  # -- checkpoints ------------------------------------------------------------------------
  def has_checkpoints(self) -> bool:
    """Whether ``checkpoints/`` holds a finished (numbered) checkpoint folder."""
    return bool(_kept_numbers(self.checkpoints_dir))

  def checkpointer(self, *, keep_every: int | None = None) -> checkpoint_lib.Checkpointer:
    """The manager a training run saves with (latest and best kept; without an evaluation,
    every ``keep_every``-th checkpoint instead of the best)."""
    return checkpoint_lib.Checkpointer(self.checkpoints_dir, keep_every=keep_every)

  @property
  def reader(self) -> checkpoint_lib.Checkpointer:
    """A read-only manager of the checkpoints (for evaluation; creates nothing)."""
    if self._reader is None:
      self._reader = checkpoint_lib.Checkpointer(self.checkpoints_dir, read_only=True)
    return self._reader

  def reference(self, value: str | int | CheckpointRef) -> CheckpointRef:
    """``value`` parsed as a checkpoint name (``CheckpointNameError`` lists this run's)."""
    return CheckpointRef.parse(value, self.checkpoints_dir)

  def default_reference(
    self, config: ml_collections.ConfigDict, *, log: bool = True
  ) -> CheckpointRef:
    """The checkpoint read when none is named: ``config.eval.checkpoint``, except that

    * a run without checkpoints and a config with ``model.pretrained`` give the initial model
      (the "direct transfer" baseline);
    * "best" in a run that evaluated no checkpoint (no query / gallery) is its latest.
    Both are logged when ``log``.
    """
    ref = self.reference(config.eval.checkpoint)
    numbers = self.reader.numbers()
    if not numbers and state_lib.has_pretrained(config):
      if log:
        logger.info(
          "no checkpoint in %s: evaluating the initial model (%s)",
          self.checkpoints_dir,
          config.model.pretrained,
        )
      return CheckpointRef(kind="init")
    if ref.kind == "best" and numbers and self.reader.best() is None:
      if log:
        logger.info(
          "no checkpoint in %s was evaluated (no query / gallery): using the latest, checkpoint %d",
          self.checkpoints_dir,
          numbers[-1],
        )
      return CheckpointRef(kind="latest")
    return ref

  def holder(self, ref: CheckpointRef) -> Run:
    """The run that holds ``ref``: this one, or the run of a checkpoint folder."""
    if ref.kind != "folder":
      return self
    checkpoints_dir = os.path.dirname(str(ref.folder))
    return Run(os.path.dirname(checkpoints_dir), checkpoints_dir=checkpoints_dir)

  def resolve(
    self,
    value: str | int | CheckpointRef | None,
    config: ml_collections.ConfigDict,
    *,
    log: bool = True,
  ) -> Checkpoint:
    """The checkpoint ``value`` names (None: ``default_reference``).

    Raises:
      CheckpointNameError: a name of no accepted form.
      CheckpointNotFoundError: no checkpoint is kept, none was evaluated ("best"), or that
        number is not kept.
    """
    ref = self.default_reference(config, log=log) if value is None else self.reference(value)
    name = str(ref)
    if ref.kind == "init":
      return Checkpoint(run=self, number=0, epoch=-1, name=name)
    run = self.holder(ref)
    if ref.kind == "folder":
      ref = CheckpointRef.parse(os.path.basename(str(ref.folder)), run.checkpoints_dir)
    number = run.find(ref)
    epoch = int(run.reader.read_meta(number)["epoch"])
    return Checkpoint(run=run, number=number, epoch=epoch, name=name)

  def find(self, ref: CheckpointRef) -> int:
    """The number of the kept checkpoint ``ref`` ("best", "latest" or a number) names."""
    numbers = self.reader.numbers()
    if not numbers:
      raise checkpoint_lib.CheckpointNotFoundError(
        f"No checkpoint in {self.checkpoints_dir}: train first with "
        "`python -m ccreid_jax.main --config ... --workdir <this workdir>`."
      )
    if ref.kind == "latest":
      return numbers[-1]
    if ref.kind == "best":
      best = self.reader.best()
      if best is None:
        raise checkpoint_lib.CheckpointNotFoundError(
          f"No evaluated checkpoint in {self.checkpoints_dir} (kept: {numbers}); "
          "use --checkpoint=latest."
        )
      return best
    if ref.number not in numbers:
      raise checkpoint_lib.CheckpointNotFoundError(
        f"Checkpoint {ref.number} is not kept in {self.checkpoints_dir}; kept: {numbers}."
      )
    return int(ref.number)

  def model_config(
    self, config: ml_collections.ConfigDict, value: str | int | CheckpointRef | None
  ) -> ml_collections.ConfigDict:
    """The config with the model settings of the run that holds the checkpoint ``value``
    names (this run, or the run of a checkpoint folder); unchanged for "init"."""
    ref = self.reference(config.eval.checkpoint if value is None else value)
    if ref.kind == "init":
      return config
    return self.holder(ref).with_model_settings(config)

  def restore(
    self,
    number: int,
    model: models.ReIDResNet,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    checkpointer: checkpoint_lib.Checkpointer | None = None,
  ) -> tuple[state_lib.TrainState, Generation, dict[str, Any]]:
    """Checkpoint ``number`` restored replicated over ``mesh``: ``(state, the clustering it
    ended with, its metadata)``."""
    checkpointer = checkpointer or self.reader
    meta = checkpointer.read_meta(number)
    abstract = state_lib.abstract_checkpoint(
      model, config, meta, NamedSharding(mesh, PartitionSpec())
    )
    restored = checkpointer.restore(number, abstract)
    state, generation = state_lib.from_checkpoint(restored.state, restored.meta, model, config)
    return state, generation, restored.meta

  def load_model(
    self,
    config: ml_collections.ConfigDict,
    value: str | int | CheckpointRef | None = None,
    *,
    mesh: Mesh | None = None,
    log: bool = True,
  ) -> LoadedModel:
    """The model of the checkpoint ``value`` names (see ``resolve``), or the initial model.

    The initial model ("init") is the random or ``config.model.pretrained`` one. Needs no
    dataset: usable from a user's own code. ``config`` gives the model (pass it through
    ``model_config`` first to evaluate with the run's own model settings).
    """
    checkpoint = self.resolve(value, config, log=log)
    model = models.create_model(config.model)
    mesh = mesh or distributed.make_mesh()
    if checkpoint.is_initial:
      state = state_lib.create_train_state(model, config)
    else:
      state, _, _ = checkpoint.run.restore(checkpoint.number, model, config, mesh)
    variables = distributed.replicate(state.variables, mesh)
    return LoadedModel(model=model, variables=variables, checkpoint=checkpoint)
