"""Layering: the host-side and memory modules never load the model, and no module of the package
or of scripts/ reaches into another module's private (``_name``) definitions."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Host side (pseudo labels, clustering, evaluation, data) and the cluster memories: numpy, scipy
# and jax arrays in and out, never the Flax model.
MODEL_FREE = (
  "ccreid_jax.ops",
  "ccreid_jax.memory",
  "ccreid_jax.camera_memory",
  "ccreid_jax.pseudo_labels",
  "ccreid_jax.clustering",
  "ccreid_jax.evaluation",
  "ccreid_jax.data.datasets",
  "ccreid_jax.data.cache",
  "ccreid_jax.data.sampler",
  "ccreid_jax.data.augment",
  "ccreid_jax.data.loading",
)

_CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(sorted(m for m in sys.modules
             if m == "ccreid_jax.models" or m.startswith("ccreid_jax.models.")))
"""


@pytest.mark.parametrize("module", MODEL_FREE)
def test_host_side_module_does_not_load_the_model(module):
  """In a fresh interpreter: importing ``module`` leaves ``ccreid_jax.models`` unloaded."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _CHECK, module],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]", f"{module} loads {result.stdout.strip()}"


def _code_files():
  for top in ("ccreid_jax", "scripts"):
    for folder, _, names in os.walk(os.path.join(ROOT, top)):
      for name in sorted(names):
        if name.endswith(".py"):
          yield os.path.join(folder, name)


def _is_package_module(dotted: str) -> bool:
  path = os.path.join(ROOT, *dotted.split("."))
  return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _foreign_privates(path: str) -> list[str]:
  """``file:line name`` for every private of another ccreid_jax module this file uses."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  modules = {}  # local name -> ccreid_jax module it is bound to
  found = []
  where = os.path.relpath(path, ROOT)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "ccreid_jax":
          modules[alias.asname or alias.name] = alias.name
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ccreid_jax":
      for alias in node.names:
        if _private(alias.name):
          found.append(f"{where}:{node.lineno} from {node.module} import {alias.name}")
        elif _is_package_module(f"{node.module}.{alias.name}"):
          modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      owner = ast.unparse(node.value)
      if owner in modules:
        found.append(f"{where}:{node.lineno} {owner}.{node.attr}")
  return found


def test_no_module_uses_another_modules_private_names():
  found = [hit for path in _code_files() for hit in _foreign_privates(path)]
  assert not found, "private names used outside their module:\n" + "\n".join(found)
