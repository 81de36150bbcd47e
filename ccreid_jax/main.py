"""Command line: ``python -m ccreid_jax.main --config configs/market1501.py --workdir runs/x``.

Only parses flags and calls ``train.train_and_evaluate`` or ``train.evaluate``.
Any config field can be overridden, e.g. ``--config.cluster.eps=0.5``.
"""

import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# Config files import `configs.default`; make the folder that holds `configs/` importable.
sys.path.insert(0, os.getcwd())

from ccreid_jax import distributed  # noqa: E402
from ccreid_jax import train  # noqa: E402
from ccreid_jax import workdir as workdir_lib  # noqa: E402
from ccreid_jax.utils import format_history_table, format_results_table  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/<name>.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, caches and logs.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "extract"],
    "train: train (or resume) and evaluate; eval: evaluate a checkpoint; extract: write the "
    "features of --split to --out (.npz).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "--mode eval/extract: 'best', 'latest', a step, the path of a step folder, or 'init' for the "
    "initial (pretrained) model (default config.eval.checkpoint; with no checkpoint and "
    "config.model.pretrained set: init).")
_SPLIT = flags.DEFINE_enum("split", "query", ["train", "query", "gallery"],
                           "--mode extract: the split whose features are written.")
_OUT = flags.DEFINE_string("out", None, "--mode extract: the .npz file to write.")
_FORCE = flags.DEFINE_bool(
    "force", False,
    "Resume although the config differs from <workdir>/config.json in fields that change results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  distributed.maybe_initialize()  # Multi-host runs: before anything touches a device.
  config = _CONFIG.value
  if _MODE.value == "train":
    results = train.train_and_evaluate(config, _WORKDIR.value, force=_FORCE.value)
    print(f"\nevaluations of {_WORKDIR.value} ({config.data.name}; values in %):")
    print(format_history_table(workdir_lib.read_metrics_lines(_WORKDIR.value)[0]))
    title = "\nfinal"
  elif _MODE.value == "extract":
    if not _OUT.value:
      raise app.UsageError("--mode extract needs --out <file.npz>")
    summary = train.extract(config, _WORKDIR.value, split=_SPLIT.value, out=_OUT.value,
                            checkpoint=_CHECKPOINT.value)
    print(json.dumps(summary))
    return
  else:
    results = train.evaluate(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value)
    evaluated_on = config.eval.dataset or config.data.name
    title = (f"initial model ({evaluated_on})" if results["step"] == 0
             else f"checkpoint step {results['step']} ({evaluated_on})")
  print(format_results_table(results, title=title))
  print(json.dumps({k: results[k] for k in sorted(results)}))


if __name__ == "__main__":
  app.run(main)
