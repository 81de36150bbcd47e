"""Shared pytest setup: CPU JAX, a persistent compilation cache, tiny generated data."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, ROOT)  # This checkout's ccreid_jax (and its configs/) is the one tested.

# The CPU settings the command line applies (ccreid_jax/xla_cpu.py: an XLA flag, glibc malloc
# reuse), before JAX starts: the tests run the program's configuration, at its speed. The
# processes the tests start inherit the flag through XLA_FLAGS.
from ccreid_jax import xla_cpu  # noqa: E402 (after sys.path: this checkout's package)

xla_cpu.apply_cpu_tuning()

import jax  # noqa: E402 (after the CPU tuning: JAX reads XLA_FLAGS when it starts)

# Every compiled program is cached, however quick to compile: the tests start many
# processes (multi-process and crash tests), and each would otherwise compile again the
# ~150 small programs of an eager model.init (13 s -> 4 s per process on 2 cores).
# Except in the processes of a multi-process job (tests/multiprocess.py): JAX writes the
# cache from process 0 only and process 1's programs (its own devices) never hit it, so
# process 0 would reach the first collective long before process 1, and gloo gives up
# after 30 s. Without a cache both processes take the same time.
if os.environ.get("CCREID_NUM_PROCESSES", "1") == "1":
  jax.config.update("jax_compilation_cache_dir", os.path.join(ROOT, ".cache", "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def load_script(name: str):
  """``scripts/<name>.py`` imported as a module (its ``main`` is not run)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(data_root: str):
  """A config that trains a 1-block ResNet on 32x16 images for a couple of steps."""
  from ccreid_jax.configs import default

  config = default.get_config()
  config.data.name = "market1501"
  config.data.root = data_root
  config.data.height = 32
  config.data.width = 16
  config.data.num_workers = 2
  config.model.depth = 10
  config.model.width = 8
  config.model.bn_group_size = 16
  config.model.pretrained = "none"
  config.train.epochs = 2
  config.train.iters = 3
  config.train.batch_size = 32
  config.train.num_instances = 4
  config.train.log_every = 2
  config.train.eval_every = 1
  config.cluster.eps = 0.7
  config.cluster.k1 = 10
  config.cluster.k2 = 3
  config.memory.min_bucket = 16
  config.eval.batch_size = 64
  config.log.progress = False
  return config


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> str:
  """A small synthetic dataset in the Market-1501 layout; returns the data root."""
  from ccreid_jax.data import synthetic

  root = str(tmp_path_factory.mktemp("data"))
  synthetic.generate_market_dataset(
    root,
    num_train_identities=16,
    num_test_identities=8,
    num_cameras=3,
    images_per_camera=(2, 3),
    height=64,
    width=32,
    seed=0,
  )
  return root


@pytest.fixture(scope="module")
def one_epoch_run(tiny_market, tmp_path_factory) -> str:
  """A finished 1-epoch tiny run (checkpoint 1); tests copy it before changing it."""
  from ccreid_jax import train

  config = tiny_config(tiny_market)
  config.train.epochs = 1
  workdir = str(tmp_path_factory.mktemp("one_epoch") / "run")
  train.train_and_evaluate(config, workdir)
  return workdir


def copy_run(workdir: str, tmp_path) -> str:
  """A copy of a run folder under ``tmp_path`` (tests change the copy, never the original)."""
  import shutil

  target = str(tmp_path / "run")
  shutil.copytree(workdir, target)
  return target


# Files whose tests take a minute or more on 2 cores (multi-process runs, crash restarts,
# whole runs), slowest first. They are collected first, so pytest-xdist's two workers start
# on them and the short files fill in at the end, instead of one worker finishing a long
# file alone while the other idles.
_SLOW_FILES = (
  "test_distributed.py",
  "test_distributed_run.py",
  "test_reliability_crash.py",
  "test_tfds.py",
  "test_train.py",
  "test_bf16.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_SLOW_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


# ---------------------------------------------------------------------------------------
# On CI a test skipped because torch cannot be imported fails instead: the parity tests
# must run there (scripts/test.sh installs torch), not pass by being skipped.
# ---------------------------------------------------------------------------------------


def on_ci(environ=os.environ) -> bool:
  """Whether ``CI`` is set to something other than "", "0" or "false" (any case)."""
  return environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _torch_missing(reason: str) -> str | None:
  """The failure message for a skip whose reason is a failed ``import torch`` (else None)."""
  if "could not import 'torch'" not in reason:
    return None
  reason = reason.strip().removeprefix("Skipped: ")
  return (
    f"torch is needed here and CI is set (CI={os.environ.get('CI')!r}), so this skip "
    f"fails the run: {reason}. Install it with `pip install torch==2.13.0` "
    "(scripts/test.sh does)."
  )


class _TorchMissing(pytest.Item):
  """Stands for a test module that skipped itself for lack of torch; it fails on CI."""

  def __init__(self, *, message: str, **kwargs):
    super().__init__(**kwargs)
    self.message = message

  def runtest(self):
    pytest.fail(self.message, pytrace=False)

  def reportinfo(self):
    return self.path, None, self.name


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
  report = yield
  message = None
  if report.skipped and on_ci():  # a module-level skip: longrepr is (path, line, reason)
    longrepr = report.longrepr
    message = _torch_missing(longrepr[-1] if isinstance(longrepr, tuple) else str(longrepr))
  if message is None:
    return report
  item = _TorchMissing.from_parent(collector, name="torch_missing", message=message)
  return pytest.CollectReport(report.nodeid, "passed", None, [item])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.skipped and on_ci() and call.excinfo is not None:
    message = _torch_missing(str(call.excinfo.value))
    if message is not None:
      report.outcome, report.longrepr = "failed", message
  return report
