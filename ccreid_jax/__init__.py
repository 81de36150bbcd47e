"""ccreid_jax: unsupervised object re-identification (Cluster Contrast, RLCC) in JAX/Flax.

Importing the package has no side effects, but for the one below in a source checkout; the
command-line programs apply the CPU settings of ``ccreid_jax.xla_cpu`` themselves.
"""

import importlib.util
import os
import sys


def _load_the_checkouts_configs() -> None:
  """Imports a source checkout's top-level ``configs/`` folder as ``ccreid_jax.configs``.

  An installed wheel holds ``ccreid_jax/configs/`` (pyproject.toml's ``package-dir`` puts the
  folder there) and an editable install's finder maps the name to the folder. A checkout
  used without installing it (the repository root on ``sys.path``, as scripts/*.py and
  scripts/device_check.sh do), or whose environment holds an editable install of another
  checkout, would find no configs or the other checkout's: there the folder next to this
  package is imported under the subpackage's name, so a checkout always runs its own.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(package)
  folder = os.path.join(root, "configs")
  init = os.path.join(folder, "__init__.py")
  if (os.path.isdir(os.path.join(package, "configs")) or f"{__name__}.configs" in sys.modules
      or not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "pyproject.toml")))):
    return
  spec = importlib.util.spec_from_file_location(f"{__name__}.configs", init,
                                                submodule_search_locations=[folder])
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  globals()["configs"] = module


_load_the_checkouts_configs()
