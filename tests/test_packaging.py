"""The package as a user installs it: a wheel of this checkout in a new virtual environment,
run from another folder, finds its recipes by name and checks config fields against the
schema it ships (``ccreid_jax.configs``)."""

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

from ccreid_jax import configs

from conftest import ROOT

# What the wheel is built from (pyproject.toml's packages and readme).
_SOURCES = ("pyproject.toml", "README.md", "ccreid_jax")


def _run(args, **kwargs):
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
  assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def _has_the_build_backend() -> bool:
  try:
    major = int(importlib.metadata.version("setuptools").split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    return False
  return major >= 77  # pyproject.toml's build-system.requires


def test_an_installed_wheel_trains_a_recipe_by_name_from_another_folder(tmp_path):
  # The wheel is built from a copy: setuptools leaves build/ and *.egg-info in the folder it
  # builds in, and a stale build/lib would carry files deleted since into later wheels.
  src = tmp_path / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in _SOURCES:
    if os.path.isdir(os.path.join(ROOT, name)):
      shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    else:
      shutil.copy(os.path.join(ROOT, name), src / name)
  isolation = ["--no-build-isolation"] if _has_the_build_backend() else []
  _run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "-q",
      *isolation,
      "-w",
      str(tmp_path / "dist"),
      str(src),
    ]
  )
  (wheel,) = (tmp_path / "dist").iterdir()
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  shipped = {
    f"ccreid_jax/configs/{n}.py"
    for n in ["__init__", "default", "variants", *configs.recipe_names()]
  }
  assert shipped <= names and not any(n.startswith("configs/") for n in names)

  # A new environment holding only the wheel; the dependencies are this interpreter's,
  # seen through a .pth file written after the install (so pip does not take this
  # environment's ccreid_jax for the wheel's), and nothing is downloaded.
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  python = str(venv / "bin" / "python")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", str(wheel)])
  purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
  mine = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
  with open(os.path.join(purelib, "zz_test_dependencies.pth"), "w") as f:
    f.write("\n".join(p for p in mine if os.path.isdir(p)) + "\n")

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CCREID_TRACEBACK")}
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  where = json.loads(
    _run(
      [
        python,
        "-c",
        (
          "import json, ccreid_jax, ccreid_jax.configs as c\n"
          "print(json.dumps([ccreid_jax.__file__, c.__file__, c.resolve('demo')]))"
        ),
      ],
      cwd=elsewhere,
      env=env,
    )
  )
  assert all(path.startswith(purelib) for path in where), where
  _run(
    [
      python,
      "-m",
      "ccreid_jax.data.synthetic",
      "--root",
      "data",
      "--num-train-identities",
      "16",
      "--num-test-identities",
      "8",
      "--num-cameras",
      "3",
      "--images-per-camera",
      "2",
      "3",
      "--height",
      "64",
      "--width",
      "32",
    ],
    cwd=elsewhere,
    env=env,
  )

  # The demo recipe by name, shrunk to a few seconds of training; and a misspelt field.
  command = [python, "-m", "ccreid_jax.main", "--config", "demo"]
  tiny = [
    "--config.data.root=data",
    "--config.train.epochs=1",
    "--config.train.iters=2",
    "--config.model.depth=10",
    "--config.model.width=16",
    "--config.model.bn_group_size=16",
    "--config.data.height=64",
    "--config.data.width=32",
    "--config.train.batch_size=16",
    "--config.train.num_instances=4",
    "--config.train.eval_initial=False",
    "--config.cluster.eps=0.7",
    "--config.cluster.k1=10",
    "--config.cluster.k2=3",
    "--config.memory.min_bucket=16",
    "--config.data.num_workers=2",
    "--config.log.ranklist_queries=0",
    "--config.log.tensorboard=False",
  ]
  runs = {
    name: subprocess.Popen(
      args, cwd=elsewhere, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for name, args in (
      ("train", command + ["--workdir", "w", *tiny]),
      ("typo", command + ["--workdir", "w2", "--config.train.epoch=3"]),
    )
  }
  results = {}
  for name, proc in runs.items():
    out, err = proc.communicate(timeout=300)
    results[name] = (proc.returncode, out, err)
  code, out, err = results["train"]
  assert code == 0, f"{out}\n{err}"
  assert os.listdir(elsewhere / "w" / "checkpoints") == ["1"], err
  code, _, err = results["typo"]
  assert code == 2 and "Traceback" not in err, err
  assert "no field 'epoch'; did you mean --config.train.epochs?" in err, err
