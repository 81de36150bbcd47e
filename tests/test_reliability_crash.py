"""Crash safety: SIGKILL a training process at seeded points, restart it, lose nothing.

Training runs in subprocesses with HOME, TMPDIR and the working directory pointed at empty
folders, so the same runs also show that nothing is written outside the workdir.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ccreid_jax import run as run_lib

from conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow

EPOCHS = 3
COMPARED = ("clusters", "outliers", "cluster_ari", "loss", "steps", "mAP", "rank1", "rank5")

_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r})
import jax
# The test suite's persistent compilation cache (conftest.py); not part of what is checked.
jax.config.update("jax_compilation_cache_dir", {jax_cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
import ml_collections
from ccreid_jax import train
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
train.train_and_evaluate(config, sys.argv[2])
"""


def _sandbox(base) -> dict[str, str]:
  dirs = {name: str(base / name) for name in ("home", "tmp", "cwd")}
  for path in dirs.values():
    os.makedirs(path)
  return dirs


def _start(config, workdir: str, sandbox: dict[str, str]) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
  env.update(
    JAX_PLATFORMS="cpu", HOME=sandbox["home"], TMPDIR=sandbox["tmp"], PYTHONDONTWRITEBYTECODE="1"
  )
  script = _SCRIPT.format(root=ROOT, jax_cache=os.path.join(ROOT, ".cache", "jax"))
  return subprocess.Popen(
    [sys.executable, "-c", script, config.to_json(), workdir],
    cwd=sandbox["cwd"],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc: subprocess.Popen) -> None:
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
  out = {}
  for d, _, names in os.walk(folder):
    for name in names:
      st = os.stat(os.path.join(d, name))
      out[os.path.relpath(os.path.join(d, name), folder)] = (st.st_size, st.st_mtime_ns)
  return out


def _config(data_root: str):
  config = tiny_config(data_root)
  config.train.epochs = EPOCHS
  return config


@pytest.fixture(scope="module")
def straight_run(tiny_market, tmp_path_factory):
  """The uninterrupted run, with a record of everything outside its workdir."""
  base = tmp_path_factory.mktemp("straight")
  sandbox = _sandbox(base)
  workdir = str(base / "run")
  data_before = _snapshot(tiny_market)
  _finish(_start(_config(tiny_market), workdir, sandbox))
  return {
    "workdir": workdir,
    "sandbox": sandbox,
    "base": str(base),
    "data_changed": _snapshot(tiny_market) != data_before,
  }


def test_nothing_is_written_outside_the_workdir(straight_run):
  for name, path in straight_run["sandbox"].items():
    assert os.listdir(path) == [], f"{name} ({path}) got {os.listdir(path)}"
  assert sorted(os.listdir(straight_run["base"])) == ["cwd", "home", "run", "tmp"]
  assert not straight_run["data_changed"], "the dataset folder was modified"
  workdir = straight_run["workdir"]
  assert {"checkpoints", "cache", "metrics.jsonl", "config.json"} <= set(os.listdir(workdir))


def _checkpoint_entries(workdir: str) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  return os.listdir(folder) if os.path.isdir(folder) else []


def _saving(workdir: str) -> bool:
  return any(".orbax-checkpoint-tmp" in name for name in _checkpoint_entries(workdir))


def _epochs_logged(workdir: str) -> int:
  records = run_lib.Run(workdir).epoch_records()
  return records[-1]["epoch"] + 1 if records else 0


def _run_until(config, workdir, sandbox, trigger, delay: float) -> bool:
  """Starts a (re)run and SIGKILLs it ``delay`` s after ``trigger()``; False if it finished."""
  proc = _start(config, workdir, sandbox)
  fired_at = None
  while proc.poll() is None:
    if fired_at is None and trigger():
      fired_at = time.monotonic()
    if fired_at is not None and time.monotonic() - fired_at >= delay:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      return True
    time.sleep(0.002)
  _, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  return False


def test_killed_and_restarted_run_equals_the_uninterrupted_one(straight_run, tiny_market, tmp_path):
  config = _config(tiny_market)
  sandbox = _sandbox(tmp_path)
  workdir = str(tmp_path / "run")
  rng = np.random.default_rng(20240611)
  # Kill 1: during the first checkpoint save (the orbax temporary folder exists), or a
  # seeded moment after it starts. Kill 2: a seeded moment after the restarted run has
  # logged epoch 1 (extraction, clustering, training or the save of epoch 1 or 2).
  schedule = [
    (
      lambda: _saving(workdir) or "1" in _checkpoint_entries(workdir),
      float(rng.choice([0.0, rng.uniform(0.0, 0.05)])),
    ),
    (lambda: _epochs_logged(workdir) >= 2, float(rng.uniform(0.0, 0.15))),
  ]
  kills, leftovers = 0, []
  for trigger, delay in schedule:
    killed = _run_until(config, workdir, sandbox, trigger, delay)
    kills += killed
    leftovers += [n for n in _checkpoint_entries(workdir) if ".orbax-checkpoint-tmp" in n]
  assert kills >= 1, "no kill landed: the runs finished before their triggers"
  restarts = 0
  while _epochs_logged(workdir) < EPOCHS or not _checkpoint_entries(workdir):
    # A finished run logs every epoch: more restarts than epochs mean one never will.
    assert restarts < EPOCHS, f"{restarts} restarts and still {_epochs_logged(workdir)} epochs"
    _run_until(config, workdir, sandbox, lambda: False, 0.0)
    restarts += 1
  print(f"kills: {kills}; temporary checkpoint folders left by a kill: {leftovers}")

  straight = run_lib.Run(straight_run["workdir"]).epoch_records()
  resumed = run_lib.Run(workdir).epoch_records()
  assert [r["epoch"] for r in straight] == [r["epoch"] for r in resumed] == list(range(EPOCHS))
  # Every epoch trained: NaN losses of untrained epochs would compare equal without showing
  # anything, so the comparison below is exact.
  assert all(r["clusters"] > 0 and np.isfinite(r["loss"]) for r in straight), straight
  for a, b in zip(straight, resumed):
    for key in COMPARED:
      assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
  for name, path in sandbox.items():
    assert os.listdir(path) == [], f"{name} got {os.listdir(path)}"
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["epochs"] == EPOCHS
