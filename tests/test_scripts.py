"""The shell entry points' argument handling, with a stand-in for .venv's python (no install)."""

import os
import shutil
import subprocess

from conftest import ROOT


def _fake_checkout(tmp_path):
  """A copy of scripts/ with a fake ``.venv/bin/python`` that records how it is called."""
  shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts")
  (tmp_path / "pyproject.toml").write_text("")
  python = tmp_path / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/../../calls.txt"\n')
  python.chmod(0o755)
  return tmp_path


def test_demo_arguments_go_to_the_trainer_not_to_pip(tmp_path):
  root = _fake_checkout(tmp_path)
  subprocess.run(
    ["bash", str(root / "scripts" / "demo.sh"), "--config.seed=2"],
    check=True,
    cwd=tmp_path,
    capture_output=True,
    env={**os.environ, "WORKDIR": "runs/s2"},
  )
  calls = (root / "calls.txt").read_text().splitlines()
  assert "-m pip install --quiet -e ." in calls  # the package without extras
  assert calls[-1] == (
    "-m ccreid_jax.main --config configs/demo.py --workdir runs/s2 --config.seed=2"
  )
  assert (root / ".venv" / ".installed-base").exists()


def test_test_script_installs_the_test_extras_and_passes_its_arguments_to_pytest(tmp_path):
  root = _fake_checkout(tmp_path)
  subprocess.run(
    ["bash", str(root / "scripts" / "test.sh"), "-k", "memory"],
    check=True,
    cwd=tmp_path,
    capture_output=True,
  )
  calls = (root / "calls.txt").read_text().splitlines()
  assert "-m pip install --quiet -e .[test]" in calls
  # The style and type checks come before the tests.
  checks = [
    "-m ruff check ccreid_jax tests scripts",
    "-m ruff format --check ccreid_jax tests scripts",
    "-m mypy",
  ]
  assert calls[-4:-1] == checks
  assert calls[-1] == "-m pytest -q -n 2 --dist loadfile -k memory"
