"""What the command line says when the user gets something wrong: one message on stderr, no
traceback, exit code 2 for what was typed (flags, config fields and values, paths) and 1 for
files that cannot be used; ``CCREID_TRACEBACK=1`` (or ``--verbose``) adds the traceback.

The command lines run at once (each pays a JAX import) and stop before any data is read.
"""

import json
import os
import subprocess
import sys

import pytest

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import run as run_lib
from ccreid_jax.data.cache import ImageDecodeError
from ccreid_jax.data.datasets import DatasetError
from ccreid_jax.models.weights import WeightsTooLargeError
from ccreid_jax.run import WorkdirConfigMismatch
from ccreid_jax.validation import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``{case: (exit code, stderr)}`` of the command lines below, and their paths."""
  tmp = tmp_path_factory.mktemp("cli")
  paths = {"missing_root": str(tmp / "no_datasets_here"), "out_dir": str(tmp / "features")}
  os.mkdir(paths["out_dir"])
  base = ["--config", "configs/demo.py"]
  cases = {
    "typo": (base + ["--workdir", str(tmp / "w1"), "--config.train.epoch=3"], {}),
    "values": (
      base
      + [
        "--workdir",
        str(tmp / "w2"),
        "--mode=eval",
        "--config.cluster.eps=2",
        f"--config.data.root={paths['missing_root']}",
      ],
      {"CCREID_TRACEBACK": "1"},
    ),
    "out": (
      base
      + [
        "--workdir",
        str(tmp / "w4"),
        "--mode=extract",
        f"--out={paths['out_dir']}",
        f"--config.data.root={paths['missing_root']}",
      ],
      {},
    ),
    # --out <workdir>/config: the sidecar would replace the run's config.json.
    "export_into_run": (
      base
      + [
        "--workdir",
        str(tmp / "w6"),
        "--mode=export",
        "--format=onnx",
        f"--out={tmp / 'w6' / 'config'}",
        "--overwrite",
        f"--config.data.root={paths['missing_root']}",
      ],
      {},
    ),
    # From another working directory: the config file imports ccreid_jax.configs.default,
    # which this checkout's package provides (the typo is found only once the file has
    # loaded). tests/test_packaging.py runs an installed wheel the same way.
    "elsewhere": (
      [
        "--config",
        os.path.join(ROOT, "configs", "custom.py"),
        "--workdir",
        str(tmp / "w5"),
        "--config.train.epoch=3",
      ],
      {"PYTHONPATH": ROOT},
    ),
  }
  procs = {}
  for name, (args, extra_env) in cases.items():
    env = {k: v for k, v in os.environ.items() if k != "CCREID_TRACEBACK"}
    env.update(JAX_PLATFORMS="cpu", **extra_env)
    procs[name] = subprocess.Popen(
      [sys.executable, "-m", "ccreid_jax.main", *args],
      cwd=str(tmp) if name == "elsewhere" else ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  results = {}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    results[name] = (proc.returncode, err)
  return results, paths


def _clean(code, err, expected_code=2, max_lines=4):
  assert code == expected_code, err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert 1 <= len(lines) <= max_lines, err
  assert lines[0].startswith("error: "), err
  return err


def test_config_field_typo_is_one_line_naming_the_field_and_the_fix(runs):
  err = _clean(*runs[0]["typo"])
  assert "--config.train.epoch=3" in err and "no field 'epoch'" in err
  assert "did you mean --config.train.epochs?" in err


def test_a_config_file_loads_from_any_working_directory(runs):
  err = _clean(*runs[0]["elsewhere"])
  assert "cannot be loaded" not in err and "no field 'epoch'" in err


def test_bad_values_with_the_traceback_asked_for(runs):
  code, err = runs[0]["values"]
  assert code == 2 and "Traceback" in err  # CCREID_TRACEBACK=1
  tail = err[err.rindex("error: ") :]
  assert "config.cluster.eps = 2" in tail and runs[1]["missing_root"] in tail


def test_workdir_that_is_a_file_and_a_misspelt_checkpoint_are_refused_up_front(tmp_path):
  from ccreid_jax import main

  path = tmp_path / "a_file"
  path.write_text("")
  with pytest.raises(main.CommandLineError) as info:
    main.check_workdir(str(path))
  assert f"--workdir {path} is a file" in str(info.value)
  main.check_workdir(str(tmp_path / "new" / "run"))  # created
  assert (tmp_path / "new" / "run").is_dir()
  (tmp_path / "new" / "run" / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(run_lib.CheckpointNameError) as info:
    run_lib.CheckpointRef.parse("bset", str(tmp_path / "new" / "run" / "checkpoints"))
  for text in (
    "'bset'",
    "did you mean 'best'",
    "'latest'",
    "'init'",
    "a checkpoint number",
    "checkpoint folder",
    "kept: 4",
  ):
    assert text in str(info.value), text
  for accepted in ("latest", "best", "init", "12", 3, str(tmp_path)):
    run_lib.CheckpointRef.parse(accepted, str(tmp_path))


def test_extract_output_checked_before_anything_is_loaded(runs):
  # The dataset root does not exist either: the --out check came first.
  err = _clean(*runs[0]["out"])
  assert f"--out {runs[1]['out_dir']} is a folder" in err


def test_export_over_a_runs_files_is_refused_before_anything_is_loaded(runs):
  err = _clean(*runs[0]["export_into_run"])
  assert "config.json, one of the files of the run in" in err
  assert "even with --overwrite" in err


def test_exit_codes_of_the_user_errors():
  from ccreid_jax import main

  usage = [
    ConfigError(["x"]),
    WorkdirConfigMismatch("w", [("a", 1, 2)]),
    run_lib.CheckpointNameError("x"),
    checkpoint_lib.CheckpointNotFoundError("x"),
  ]
  files = [
    DatasetError("x"),
    ImageDecodeError("x"),
    checkpoint_lib.CheckpointError("x"),
    WeightsTooLargeError("x"),
  ]
  assert [main.exit_code_of(e) for e in usage] == [2] * len(usage)
  assert [main.exit_code_of(e) for e in files] == [1] * len(files)
  assert main.exit_code_of(RuntimeError("a bug")) is None  # bugs keep their traceback


def test_epochs_with_one_cluster_or_none_are_warned_about_in_the_summary(tmp_path):
  """A run whose clustering degenerated printed its table and exited 0 without a word
  (issue 38, item 10)."""
  from ccreid_jax import main

  from conftest import tiny_config

  config = tiny_config(str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for epoch, clusters in enumerate([0, 1, 1, 5]):
      f.write(
        json.dumps(
          {"kind": "epoch", "epoch": epoch, "clusters": clusters, "loss": 0.0, "steps": 3 * epoch}
        )
        + "\n"
      )
  text = main.training_summary(config, str(tmp_path), {"epoch": 3, "checkpoints": [4]})
  assert "WARNING: in 1 of 4 epochs (epoch 0) the clustering found no cluster" in text
  assert "WARNING: in 2 of 4 epochs (epoch 1, 2) the clustering put every image in one" in text
  assert "--mode sweep" in text


def test_nothing_trained_is_said_instead_of_an_empty_table(tmp_path):
  from ccreid_jax import main

  from conftest import tiny_config

  config = tiny_config(str(tmp_path))
  config.train.epochs = 0
  text = main.training_summary(config, str(tmp_path), {})
  assert "nothing was trained" in text and "train.epochs is 0" in text
  assert "mAP" not in text
