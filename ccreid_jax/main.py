"""Command line: ``python -m ccreid_jax.main --config configs/market1501.py --workdir runs/x``.

This file is kept short: it parses flags and calls one function per ``--mode`` (``MODES``):
``train.train_and_evaluate`` or one of ``commands`` (evaluate, extract, search, export,
sweep). Any config field can be overridden, e.g. ``--config.cluster.eps=0.5``.

A user error (a misspelt flag or config field, a bad value or path, a dataset, checkpoint or
weights file that cannot be used) ends with one ``error: ...`` message on stderr and no
traceback; the exit code is 2 for what was typed and 1 for files that cannot be used.
``--verbose`` or ``CCREID_TRACEBACK=1`` in the environment adds the traceback.
"""

import difflib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import (
  commands,
  configs,
  distributed,
  feature_files,
  inference,
  train,
  validation,
  xla_cpu,
)
from ccreid_jax import export as export_lib
from ccreid_jax import run as run_lib
from ccreid_jax.data.cache import CacheSpaceError, ImageDecodeError
from ccreid_jax.data.datasets import DatasetError
from ccreid_jax.errors import StorageError, check_writable
from ccreid_jax.models import weights
from ccreid_jax.tools import eps_sweep
from ccreid_jax.utils import format_history_table, format_results_table, printable
from ccreid_jax.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A recipe name (market1501, msmt17_cam, demo, ...; ccreid_jax.configs.recipe_names()) or "
  "the path of a config file.",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, caches and logs.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "extract", "search", "export", "sweep"],
  "train: train (or resume) and evaluate; eval: evaluate a checkpoint; extract: write the "
  "features of --split to --out (.npz); search: rank the images of --gallery for each "
  "--query image (prints the ranked paths with distances, writes a rank-list PNG); export: "
  "write the model for serving in --format to --out; sweep: cluster the train features of "
  "a checkpoint at every DBSCAN radius of --eps (a table, and a JSON and PNG in --out).",
)
CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "--mode eval/extract/search/export/sweep: 'best', 'latest', a checkpoint number (the epochs "
  "it finished), the path of a checkpoint folder, or 'init' for the initial (pretrained) "
  "model (default config.eval.checkpoint; with no checkpoint and config.model.pretrained "
  "set: init).",
)
_SPLIT = flags.DEFINE_enum(
  "split",
  "query",
  ["train", "query", "gallery"],
  "--mode extract: the split whose features are written.",
)
OUT = flags.DEFINE_string(
  "out",
  None,
  "--mode extract: the .npz file to write; --mode search: the rank-list PNG (default "
  "<workdir>/search_ranklist.png); --mode export: a folder (stablehlo) or a .onnx file; "
  "--mode sweep: the folder of eps_sweep_<checkpoint>.json and .png (default --workdir).",
)
_QUERY = flags.DEFINE_string("query", None, "--mode search: a query image, or a folder of them.")
_GALLERY = flags.DEFINE_string(
  "gallery", None, "--mode search: the folder of gallery images (searched recursively)."
)
_TOPK = flags.DEFINE_integer(
  "topk", 10, "--mode search: matches listed and drawn per query.", lower_bound=1
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "stablehlo",
  ["stablehlo", "onnx"],
  "--mode export: stablehlo (--out is a folder: model.stablehlo + model.stablehlo.json) or "
  "onnx (--out is a .onnx file, with <file>.json beside it).",
)
_EPS = flags.DEFINE_string(
  "eps",
  "0.3:0.8:0.05",
  "--mode sweep: DBSCAN radii to try: start:stop:step (stop included), a comma-separated "
  "list, or one value; each in (0, 1).",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "--mode export: replace an existing export (model file and sidecar) at --out; a run's own "
  "files (config.json, checkpoints/, ...) are never replaced.",
)
_FORCE = flags.DEFINE_bool(
  "force",
  False,
  "Resume although the config differs from <workdir>/config.json in fields that change results.",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "On an error, print the traceback too (as does CCREID_TRACEBACK=1 in the environment).",
)
flags.mark_flags_as_required(["config", "workdir"])


class CommandLineError(ValueError):
  """A flag value that cannot work (a --workdir that is a file, a missing --out, ...)."""


def _given(holder: flags.FlagHolder[str | None]) -> str:
  """The value of a string flag that absl requires or the mode's check has seen given."""
  if holder.value is None:
    raise CommandLineError(f"--{holder.name} is needed")
  return holder.value


# Errors of what was typed (exit code 2) and of files that cannot be used (exit code 1). Any
# other exception is a bug and keeps its traceback.
_USAGE_ERRORS = (
  CommandLineError,
  ConfigError,
  run_lib.WorkdirConfigMismatch,
  train.TrainingSetChanged,
  inference.InferencePathError,
  run_lib.CheckpointNameError,
  checkpoint_lib.CheckpointNotFoundError,
  feature_files.OutputPathError,
  app.UsageError,
)
_FILE_ERRORS = (
  DatasetError,
  ImageDecodeError,
  CacheSpaceError,
  checkpoint_lib.CheckpointError,
  run_lib.WorkdirLocked,
  run_lib.RunConfigError,
  export_lib.ExportUnavailableError,
  weights.WeightsFormatError,
  weights.WeightsMismatchError,
  StorageError,
)


def exit_code_of(exc: BaseException) -> int | None:
  """2 for a user error in the command line or config, 1 for an unusable file, else None."""
  if isinstance(exc, _USAGE_ERRORS):
    return 2
  if isinstance(exc, _FILE_ERRORS):
    return 1
  return None


def traceback_asked(argv: list[str] | None = None) -> bool:
  if os.environ.get("CCREID_TRACEBACK", "") not in ("", "0"):
    return True
  if argv is not None:  # flags not parsed (yet): look for --verbose itself.
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv[1:])
  return bool(_VERBOSE.value)


def fail(message: str, code: int, *, show_traceback: bool) -> None:
  """Prints ``error: message`` (after the traceback when asked for) and exits with ``code``."""
  if show_traceback:
    traceback.print_exc()
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _unknown_config_field(argv: list[str]) -> str | None:
  """Explains the first ``--config.<path>`` override that names no field of the config."""
  config: Any = flags.FLAGS["config"].value  # a ConfigDict, unless reading the file failed
  if not hasattr(config, "keys"):  # the error came while the file was read: its tree is
    config = validation.default_config()  # configs/default.py's, as validation checks it.
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    node, group = config, "config"
    for key in arg[2:].split("=", 1)[0].split(".")[1:]:
      if not hasattr(node, "keys"):
        return f"{arg}: {group} is a value, not a group of fields"
      if key not in node:
        replaced = validation.REPLACED_FIELDS.get(f"{group}.{key}".partition(".")[2])
        if replaced is not None:
          return f"{arg}: {replaced}"
        fields = list(node.keys())
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean --{group}.{close[0]}?" if close else ""
        return f"{arg}: {group} has no field {key!r}{hint}\nFields of {group}: {', '.join(fields)}"
      node, group = node[key], f"{group}.{key}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with flag and config-override errors as one clean message; a recipe
  name given to --config becomes the path of the packaged file."""
  try:
    argv = _resolve_config_argument(argv)
  except ValueError as exc:
    fail(f"--config {exc}", 2, show_traceback=traceback_asked(argv))
  try:
    return flags.FLAGS(argv)
  except flags.Error as exc:
    fail(f"{exc} (see --helpshort)", 2, show_traceback=traceback_asked(argv))
  except Exception as exc:  # ml_collections raises KeyError / AttributeError for overrides.
    problem = _unknown_config_field(argv) if isinstance(exc, (KeyError, AttributeError)) else None
    if problem is None:  # the config file runs while the flags are parsed
      problem = (
        f"--config {_config_argument(argv)}: the config file cannot be loaded: "
        f"{type(exc).__name__}: {exc}"
      )
    fail(problem, 2, show_traceback=traceback_asked(argv))
  raise AssertionError("unreachable")


def _resolve_config_argument(argv: list[str]) -> list[str]:
  """``argv`` with the value of ``--config X`` / ``--config=X`` through ``configs.resolve``:
  a recipe name (``--config market1501``) becomes the packaged file's path."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    if arg.startswith("--config="):
      argv[i] = "--config=" + configs.resolve(arg[len("--config=") :])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = configs.resolve(argv[i + 1])
  return argv


def _config_argument(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config=") :]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def check_workdir(path: str) -> None:
  """Refuses a --workdir that is a file or cannot be created, before anything is loaded."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise CommandLineError(
      f"--workdir {path} is a file, not a folder: name the folder of the "
      "run (it is created when missing)."
    )
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as exc:
    raise CommandLineError(f"--workdir {path} cannot be created: {exc.strerror or exc}.") from None


def load_config() -> ml_collections.ConfigDict:
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load gives an object that raises when used
  except Exception as exc:  # absl re-raises whatever the config file raised
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    reason = str(exc).replace(
      "Configuration is not available because of an earlier failure to load: ", ""
    )
    raise CommandLineError(f"--config {name}: the config file cannot be loaded: {reason}") from exc
  return config


def training_summary(
  config: ml_collections.ConfigDict, workdir: str, results: dict[str, object]
) -> str:
  """What the command line prints after training: the evaluations, or that nothing was
  trained (no epoch to train and no checkpoint)."""
  records = run_lib.Run(workdir).metrics_lines()[0]
  lines = []
  if any("mAP" in r for r in records):
    lines += [
      f"\nevaluations of {workdir} ({config.data.name}; values in %):",
      format_history_table(records),
    ]
  if not results:
    lines.append(
      f"\nnothing was trained: train.epochs is {config.train.epochs} and {workdir} "
      "holds no checkpoint (set --config.train.epochs=N to train N epochs)."
    )
  epochs = {r["epoch"]: r for r in records if r.get("kind") == "epoch"}
  for clusters, what in (
    (0, "found no cluster (nothing was trained)"),
    (1, "put every image in one cluster (loss 0: nothing was learnt)"),
  ):
    degenerate = sorted(e for e, r in epochs.items() if r.get("clusters") == clusters)
    if degenerate:
      lines.append(
        f"\nWARNING: in {len(degenerate)} of {len(epochs)} epochs (epoch "
        f"{', '.join(map(str, degenerate))}) the clustering {what}. "
        f"{train.DEGENERATE_ADVICE}"
      )
  return "\n".join(lines)


def log_to_stderr() -> None:
  """The package's log lines on stderr as ``HH:MM:SS message`` (absl's own prefix left out)."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  logger = logging.getLogger("ccreid_jax")
  logger.handlers[:] = [handler]
  logger.setLevel(logging.INFO)
  logger.propagate = False
  # Other libraries' INFO lines (JAX's note that it found no TPU library on every CPU and GPU
  # start, the ONNX converter's progress) are left out; their warnings are kept.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------
# The modes: each checks its flags before anything is loaded, then runs one command.
# ---------------------------------------------------------------------------------------


def _nothing_to_check() -> None:
  """Modes whose flags need no check before loading (train, eval)."""


def _train(config: ml_collections.ConfigDict, workdir: str) -> None:
  results = train.train_and_evaluate(config, workdir, force=_FORCE.value)
  print(training_summary(config, workdir, results))
  if not results:
    return
  if "best" not in results:  # nothing to evaluate on: the checkpoints kept.
    print(
      f"\nno query / gallery to evaluate on; checkpoints kept in {workdir}/"
      f"checkpoints: {', '.join(map(str, results['checkpoints']))} (evaluate one with "
      "--mode eval --config.eval.list=..., or sweep eps on it with --mode sweep)"
    )
    return
  print(format_results_table(results["best"], title=f"\nbest (epoch {results['best']['epoch']})"))
  print(format_results_table(results["last"], title=f"\nlast (epoch {results['last']['epoch']})"))
  print(json.dumps(results, sort_keys=True))


def _eval(config: ml_collections.ConfigDict, workdir: str) -> None:
  results = commands.evaluate(config, workdir, checkpoint=CHECKPOINT.value)
  evaluated_on = config.eval.dataset or config.data.name
  if not config.eval.dataset and config.eval.get("list"):
    evaluated_on = f"eval list {config.eval.list}"
  title = (
    f"initial model ({evaluated_on})"
    if results["checkpoint"] == 0
    else f"checkpoint {results['checkpoint']}: after epoch {results['epoch']} ({evaluated_on})"
  )
  print(format_results_table(results, title=title))
  print(json.dumps({k: results[k] for k in sorted(results)}))


def _check_extract() -> None:
  if not OUT.value:
    raise CommandLineError("--mode extract needs --out <file.npz>")
  feature_files.check_output_path(OUT.value)


def _extract(config: ml_collections.ConfigDict, workdir: str) -> None:
  summary = commands.extract(
    config, workdir, split=_SPLIT.value, out=_given(OUT), checkpoint=CHECKPOINT.value
  )
  print(json.dumps(summary))


def _check_search() -> None:
  if not (_QUERY.value and _GALLERY.value):
    raise CommandLineError("--mode search needs --query <image or folder> and --gallery <folder>")
  if OUT.value:
    feature_files.check_output_path(OUT.value)


def _search(config: ml_collections.ConfigDict, workdir: str) -> None:
  records, png = commands.search(
    config,
    workdir,
    _given(_QUERY),
    _given(_GALLERY),
    topk=_TOPK.value,
    out_png=OUT.value,
    checkpoint=CHECKPOINT.value,
  )
  print(inference.format_search_results(records))
  print(f"rank list: {printable(png)}")


def _check_export() -> None:
  if not OUT.value:
    raise CommandLineError(
      "--mode export needs --out (a folder for --format=stablehlo, a .onnx file for --format=onnx)"
    )
  if _FORMAT.value == "onnx":
    feature_files.check_output_path(OUT.value)
  export_lib.check_export_paths(
    _FORMAT.value, OUT.value, overwrite=_OVERWRITE.value, workdirs=(_given(WORKDIR),)
  )


def _export(config: ml_collections.ConfigDict, workdir: str) -> None:
  print(
    json.dumps(
      commands.export(
        config,
        workdir,
        _FORMAT.value,
        _given(OUT),
        checkpoint=CHECKPOINT.value,
        overwrite=_OVERWRITE.value,
      ),
      sort_keys=True,
    )
  )


def _eps_values() -> list[float]:
  try:
    return eps_sweep.parse_eps(_EPS.value)
  except ValueError as exc:
    raise CommandLineError(str(exc)) from None


def _check_sweep() -> None:
  _eps_values()
  out = OUT.value or _given(WORKDIR)
  if os.path.exists(out) and not os.path.isdir(out):
    raise CommandLineError(f"--out {out} is a file; name a folder (created when missing)")
  check_writable(out, "the sweep's --out folder")


def _sweep(config: ml_collections.ConfigDict, workdir: str) -> None:
  result = commands.sweep(
    config, workdir, _eps_values(), checkpoint=CHECKPOINT.value, out=OUT.value or workdir
  )
  print(
    f"eps sweep of {result['num_train']} train images, checkpoint {result['checkpoint']} "
    f"({result['distance']} distance, min_samples {result['min_samples']}):"
  )
  print(eps_sweep.format_table(result["rows"], result["configured_eps"]))
  if "json" in result:
    print(f"wrote {result['json']} and {result['png']}")


# --mode -> (the check of its flags, the command).
MODES: dict[str, tuple[Callable[[], None], Callable[[ml_collections.ConfigDict, str], None]]] = {
  "train": (_nothing_to_check, _train),
  "eval": (_nothing_to_check, _eval),
  "extract": (_check_extract, _extract),
  "search": (_check_search, _search),
  "export": (_check_export, _export),
  "sweep": (_check_sweep, _sweep),
}


def main(argv: list[str]) -> None:
  try:
    _run(argv)
  except Exception as exc:
    code = exit_code_of(exc)
    if code is None:
      raise
    fail(str(exc), code, show_traceback=traceback_asked())


def _run(argv: list[str]) -> None:
  if len(argv) > 1:
    raise CommandLineError(
      f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)"
    )
  check_flags, command = MODES[_MODE.value]
  check_flags()  # before anything is loaded.
  workdir = _given(WORKDIR)
  check_workdir(workdir)
  if _MODE.value in ("train", "eval"):  # they write into the run folder.
    check_writable(workdir, "the run folder --workdir")
  config = load_config()
  if _MODE.value != "train":
    run_lib.Run(workdir).reference(
      config.eval.checkpoint if CHECKPOINT.value is None else CHECKPOINT.value
    )
  log_to_stderr()
  distributed.maybe_initialize()  # Multi-host runs: before anything touches a device.
  command(config, workdir)


def run() -> None:
  """The command line: CPU settings first (``xla_cpu``), then the flags and the mode."""
  # The CPU settings of ccreid_jax/xla_cpu.py (an XLA flag, glibc malloc reuse), applied
  # before JAX's backend starts; CCREID_XLA_CPU_DEFAULTS=0 in the environment turns them off.
  xla_cpu.apply_cpu_tuning()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
