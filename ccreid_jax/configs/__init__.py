"""The config schema and the recipes of ccreid_jax, installed as ``ccreid_jax.configs``.

``default.py`` holds every field of a run with the published Cluster Contrast defaults,
``variants.py`` the changes that several recipes share (InfoMap, RLCC, the official RLCC
recipe, CA-Jaccard). Every other module is a recipe, run by its name
(``--config market1501``) or by its path, from any working directory. A config of your own
starts from the defaults the same way::

    from ccreid_jax.configs import default


    def get_config():
      config = default.get_config()
      config.cluster.eps = 0.5
      return config

In the repository the top-level ``configs`` is a link to this folder, so paths such as
``configs/market1501.py`` work from the repository root as names do from anywhere.
"""

import difflib
import os

__all__ = ["FOLDER", "recipe_names", "resolve"]

FOLDER = os.path.dirname(os.path.abspath(__file__))
# Modules of the package that are no recipe.
_NOT_RECIPES = ("default", "variants")


def recipe_names() -> list[str]:
  """The names ``--config`` accepts for the recipes of this package, sorted."""
  return sorted(
    name[:-3]
    for name in os.listdir(FOLDER)
    if name.endswith(".py") and not name.startswith("_") and name[:-3] not in _NOT_RECIPES
  )


def resolve(arg: str) -> str:
  """The config file that ``--config arg`` names: a path, or the name of a recipe here.

  Args:
    arg: the path of a config file, or a recipe name with or without ``.py``
      (``market1501``, ``msmt17_cam.py``); either may end with absl's ``:argument`` for
      ``get_config`` (``msmt17_cam:x``), which is kept.

  Returns:
    ``arg`` itself when its path exists (a file of that name in the working directory wins
    over a recipe), else the recipe file's path followed by the ``:argument``.

  Raises:
    ValueError: ``arg`` is neither an existing path nor a recipe name; the message lists the
      recipe names, the closest first.
  """
  path, colon, argument = arg.partition(":")
  if os.path.exists(path):
    return arg
  names = recipe_names()
  name = path[:-3] if path.endswith(".py") else path
  if name in names:
    return os.path.join(FOLDER, f"{name}.py") + colon + argument
  if os.sep in path or "/" in path:  # meant as a path
    base = os.path.basename(name)
    packaged = f"; the package's recipe of that name is --config {base}" if base in names else ""
    raise ValueError(f"{path}: no such file{packaged}")
  close = difflib.get_close_matches(name, names, n=1)
  hint = f"; did you mean {close[0]}?" if close else ""
  raise ValueError(
    f"{path}: no such file and no recipe of that name{hint}\nRecipes: {', '.join(names)}"
  )
