"""tests/conftest.py on CI: a test skipped because torch cannot be imported fails the run.

pytest runs, in a subprocess, two generated test files in which ``import torch`` fails (None
in ``sys.modules``), with tests/conftest.py loaded as a plugin: once with ``CI=true``, once
with ``CI=0``.
"""

import os
import subprocess
import sys

from conftest import ROOT, on_ci

_MODULE_SKIP = """
import sys
import pytest
sys.modules["torch"] = None  # as if torch were not installed
torch = pytest.importorskip("torch")

def test_uses_torch():
  assert torch
"""

_FUNCTION_SKIPS = """
import sys
import pytest
sys.modules["torch"] = None

def test_function_level():
  pytest.importorskip("torch")

def test_other_skip():
  pytest.skip("not about torch")

def test_plain():
  pass
"""


def test_on_ci_reads_the_ci_variable():
  assert not any(
    on_ci(env)
    for env in ({}, {"CI": ""}, {"CI": "0"}, {"CI": "false"}, {"CI": "False"}, {"CI": " FALSE "})
  )
  assert all(on_ci({"CI": value}) for value in ("true", "1", "yes", "True"))


def test_a_torch_skip_fails_on_ci_and_stays_a_skip_elsewhere(tmp_path):
  (tmp_path / "test_parity_fake.py").write_text(_MODULE_SKIP)
  (tmp_path / "test_other.py").write_text(_FUNCTION_SKIPS)
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  env.update(PYTHONPATH=os.path.join(ROOT, "tests"), JAX_PLATFORMS="cpu")
  command = [
    sys.executable,
    "-m",
    "pytest",
    "-p",
    "conftest",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:xdist",
    "-rA",
    "-q",
    "--rootdir",
    str(tmp_path),
    str(tmp_path),
  ]
  procs = {
    ci: subprocess.Popen(
      command,
      cwd=tmp_path,
      env=dict(env, CI=ci),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for ci in ("true", "0")
  }
  outputs = {ci: proc.communicate(timeout=120)[0] for ci, proc in procs.items()}

  on, off = outputs["true"], outputs["0"]
  assert procs["true"].returncode == 1, on
  assert "FAILED test_parity_fake.py::torch_missing - Failed: torch is needed here" in on
  assert "FAILED test_other.py::test_function_level - torch is needed here" in on
  assert "could not import 'torch'" in on and "pip install torch==2.13.0" in on
  assert "SKIPPED [1] test_other.py:10: not about torch" in on  # other skips stay skips
  assert "PASSED test_other.py::test_plain" in on
  assert "2 failed, 1 passed, 1 skipped" in on

  assert procs["0"].returncode == 0, off
  assert "1 passed, 3 skipped" in off and "FAILED" not in off
