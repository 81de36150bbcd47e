"""Exports for serving: the StableHLO file run by JAX alone in a fresh process, and the ONNX
model run by ONNX Runtime, give the in-process model's features at two batch sizes. The
StableHLO export is written with the package's base dependencies only and read with jax, numpy
and flatbuffers only (other installed packages are made unimportable in those processes)."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import jax
import numpy as np
import pytest

from ccreid_jax import export as export_lib
from ccreid_jax import inference, models
from ccreid_jax.data import augment

from tiny_model import tiny_model_and_variables

HEIGHT, WIDTH = 32, 16
BATCH_SIZES = (1, 5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prepended to a child process's code: makes every installed top-level module unimportable
# whose distribution is not in ALLOWED (a JSON list of normalised names), as on a machine
# where only those are installed. Standard-library modules and modules of no installed
# distribution (the tests' helpers) stay importable.
_ONLY_ALLOWED = textwrap.dedent("""
    import importlib.metadata, json, re, sys
    _allowed = set(json.loads(sys.argv.pop(1)))
    _owners = importlib.metadata.packages_distributions()

    class _Block:
      def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in _owners.get(top, ())}
        if top in sys.stdlib_module_names or not dists or dists & _allowed:
          return None
        raise ModuleNotFoundError(f"No module named {name!r} (not allowed here)", name=name)

    sys.meta_path.insert(0, _Block())
""")

# Runs a StableHLO export with jax, numpy and flatbuffers only.
_RUN_STABLEHLO = _ONLY_ALLOWED + textwrap.dedent("""
    import jax
    import numpy as np
    path, inputs, outputs = sys.argv[1:4]
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(inputs) as data:
      results = {name: np.asarray(exported.call(data[name])) for name in data.files}
    np.savez(outputs, **results)
""")


# Writes a StableHLO export of the tiny model with the package's base dependencies only.
_EXPORT_STABLEHLO = _ONLY_ALLOWED + textwrap.dedent("""
    from ccreid_jax import inference
    from ccreid_jax import export as export_lib
    from tiny_model import tiny_model_and_variables
    model, variables = tiny_model_and_variables(32, 16)
    embedder = inference.Embedder(model, variables, height=32, width=16)
    export_lib.export_stablehlo(embedder, sys.argv[1], platforms=("cpu",))
""")


def _name(requirement):
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _with_requirements(names):
  """The distributions ``names`` and everything they require (extras left out)."""
  found, todo = set(), [_name(n) for n in names]
  while todo:
    name = todo.pop()
    if name in found:
      continue
    found.add(name)
    try:
      requirements = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    todo += [_name(r) for r in requirements if not re.search(r"\bextra\s*==", r)]
  return sorted(found)


def _base_dependencies():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["dependencies"]


def _run_child(code, allowed, *args):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
  )
  return subprocess.run(
    [sys.executable, "-c", code, json.dumps(allowed), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture(scope="module")
def tiny_model():
  return tiny_model_and_variables(HEIGHT, WIDTH)


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)


def _embedder(tiny_model, flip=False):
  model, variables = tiny_model
  return inference.Embedder(
    model,
    variables,
    height=HEIGHT,
    width=WIDTH,
    flip=flip,
    source={"workdir": "/runs/x", "checkpoint": "best", "number": 7, "epoch": 3},
  )


def _check_common_sidecar(sidecar, embedder):
  assert (sidecar["height"], sidecar["width"]) == (HEIGHT, WIDTH)
  assert sidecar["feature_dim"] == embedder.feature_dim == models.feature_dim(10, 8)
  assert sidecar["mean"] == list(augment.IMAGENET_MEAN)
  assert sidecar["std"] == list(augment.IMAGENET_STD)
  assert sidecar["checkpoint"] == {
    "workdir": "/runs/x",
    "checkpoint": "best",
    "number": 7,
    "epoch": 3,
  }
  assert sidecar["output_shape"] == ["batch", embedder.feature_dim]
  assert sidecar["flip"] is embedder.flip


def test_stablehlo_export_runs_with_jax_alone(tiny_model, tmp_path):
  embedder = _embedder(tiny_model)
  path = export_lib.export_stablehlo(embedder, str(tmp_path / "export"))
  assert path == str(tmp_path / "export" / export_lib.STABLEHLO_FILE)
  inputs = {f"b{n}": _images(n, seed=n) for n in BATCH_SIZES}
  np.savez(tmp_path / "inputs.npz", **inputs)
  allowed = _with_requirements(["jax", "numpy", "flatbuffers"])
  assert "ccreid-jax" not in allowed
  child = _run_child(
    _RUN_STABLEHLO, allowed, path, str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")
  )
  assert child.returncode == 0, child.stderr[-3000:]
  with np.load(tmp_path / "outputs.npz") as outputs:
    for name, images in inputs.items():
      got, want = outputs[name], embedder.embed(images)
      assert got.shape == want.shape == (len(images), embedder.feature_dim)
      assert np.abs(got - want).max() <= 1e-4, name

  with open(path + ".json") as f:
    sidecar = json.load(f)
  _check_common_sidecar(sidecar, embedder)
  assert sidecar["format"] == "stablehlo" and sidecar["file"] == export_lib.STABLEHLO_FILE
  assert sidecar["input_layout"] == "NHWC" and sidecar["input_dtype"] == "uint8"
  assert sidecar["input_shape"] == ["batch", HEIGHT, WIDTH, 3]
  assert sidecar["input_value_range"] == [0, 255] and sidecar["normalization_included"]
  assert set(sidecar["platforms"]) == {"cpu", "cuda"}


def test_stablehlo_export_needs_only_the_base_dependencies(tmp_path):
  """``pip install ccreid_jax`` can export: the serializer's flatbuffers is no jax
  requirement, so it must be one of ours."""
  allowed = _with_requirements(_base_dependencies()) + ["ccreid-jax"]
  child = _run_child(_EXPORT_STABLEHLO, allowed, str(tmp_path))
  assert child.returncode == 0, child.stderr[-3000:]
  assert os.path.isfile(tmp_path / export_lib.STABLEHLO_FILE)


def test_stablehlo_export_with_flip_and_float_input(tiny_model, tmp_path):
  embedder = _embedder(tiny_model, flip=True)
  path = export_lib.export_stablehlo(
    embedder, str(tmp_path), input_dtype="float32", platforms=("cpu",)
  )
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  images = _images(3, seed=9)
  got = np.asarray(exported.call(images.astype(np.float32)))
  assert np.abs(got - embedder.embed(images)).max() <= 1e-4
  with pytest.raises(ValueError, match="input_dtype"):
    export_lib.export_stablehlo(embedder, str(tmp_path), input_dtype="float16")


def test_onnx_export_matches_the_model_in_onnxruntime(tiny_model, tmp_path):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  embedder = _embedder(tiny_model)
  out = str(tmp_path / "onnx" / "reid.onnx")
  assert export_lib.export_onnx(embedder, out) == out
  runtime = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  (feed,) = runtime.get_inputs()
  assert feed.name == "images" and feed.type == "tensor(float)"
  assert feed.shape[1:] == [3, HEIGHT, WIDTH] and not isinstance(feed.shape[0], int)
  assert [o.name for o in runtime.get_outputs()] == ["features"]
  for n in BATCH_SIZES:
    images = _images(n, seed=10 + n)
    (got,) = runtime.run(None, {"images": export_lib.onnx_input(images)})
    want = embedder.embed(images)
    assert got.shape == want.shape == (n, embedder.feature_dim)
    assert np.abs(got - want).max() <= 1e-4, n

  with open(out + ".json") as f:
    sidecar = json.load(f)
  _check_common_sidecar(sidecar, embedder)
  assert sidecar["format"] == "onnx" and sidecar["file"] == "reid.onnx"
  assert sidecar["input_layout"] == "NCHW" and sidecar["input_dtype"] == "float32"
  assert sidecar["input_shape"] == ["batch", 3, HEIGHT, WIDTH]
  assert not sidecar["normalization_included"]
  assert sidecar["opset"] == export_lib.ONNX_OPSET
  import onnx

  assert (
    max(o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx"))
    == export_lib.ONNX_OPSET
  )


def test_onnx_input_is_the_test_transform_transposed():
  images = _images(2, seed=4)
  x = export_lib.onnx_input(images)
  assert x.shape == (2, 3, HEIGHT, WIDTH) and x.dtype == np.float32
  mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
  want = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(x, want, atol=1e-5)


def test_onnx_export_without_the_converter_says_how_to_install_it(
  tiny_model, tmp_path, monkeypatch
):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if it were not installed
  out = tmp_path / "reid.onnx"
  with pytest.raises(export_lib.ExportUnavailableError) as info:
    export_lib.export_onnx(_embedder(tiny_model), str(out))
  message = str(info.value)
  assert 'pip install "ccreid_jax[export]"' in message
  assert "pip install --no-deps jax2onnx==0.17.1" in message
  assert not os.path.exists(out) and not os.listdir(tmp_path)


def test_the_converter_version_is_the_one_the_scripts_install():
  with open(os.path.join(ROOT, "scripts", "test.sh")) as f:
    assert export_lib.JAX2ONNX in f.read()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_export_loads_and_matches_the_embedder(dtype, tmp_path, capfd):
  """The exports of a float32 and of a bfloat16 run: the StableHLO file runs in JAX (in the
  run's dtype); the ONNX file (float32 either way: ONNX has no bfloat16 convolution) passes
  the checker's full check and loads in ONNX Runtime without a warning; both give
  ``Embedder.embed``'s features, a bfloat16 run's within its rounding."""
  pytest.importorskip("jax2onnx")
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  model, variables = tiny_model_and_variables(HEIGHT, WIDTH, dtype=dtype)
  embedder = inference.Embedder(model, variables, height=HEIGHT, width=WIDTH)
  images = _images(5, seed=3)
  want = embedder.embed(images)

  def close(got, atol):
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= atol
    assert np.min(np.sum(got * want, axis=1)) >= 0.999  # cosine similarity, unit rows

  path = export_lib.export_stablehlo(embedder, str(tmp_path / "stablehlo"), platforms=("cpu",))
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  close(np.asarray(exported.call(images)), 1e-4 if dtype == "float32" else 1e-2)

  out = export_lib.export_onnx(embedder, str(tmp_path / "reid.onnx"))
  onnx.checker.check_model(onnx.load(out), full_check=True)
  capfd.readouterr()
  options = ort.SessionOptions()
  options.log_severity_level = 2  # warnings and errors, on stderr
  runtime = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
  (got,) = runtime.run(None, {"images": export_lib.onnx_input(images)})
  assert capfd.readouterr().err == ""
  close(got, 1e-4 if dtype == "float32" else 2e-2)
  with open(out + ".json") as f:
    sidecar = json.load(f)
  assert sidecar["compute_dtype"] == "float32" and sidecar["model"]["dtype"] == dtype
  assert sidecar.get("note", "").startswith(
    "exported in float32 from a bfloat16 run" if dtype == "bfloat16" else ""
  )
  with open(path + ".json") as f:
    assert json.load(f)["compute_dtype"] == dtype
