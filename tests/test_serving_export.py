"""Exports for serving: the StableHLO file run by JAX alone in a fresh process, and the ONNX
model run by ONNX Runtime, give the in-process model's features at two batch sizes."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ccreid_jax import inference, models
from ccreid_jax.data import augment
from tiny_model import tiny_model_and_variables

HEIGHT, WIDTH = 32, 16
BATCH_SIZES = (1, 5)

# Runs a StableHLO export with jax and numpy only: importing ccreid_jax would fail.
_RUN_STABLEHLO = textwrap.dedent("""
    import sys
    sys.modules["ccreid_jax"] = None
    import jax
    import numpy as np
    path, inputs, outputs = sys.argv[1:4]
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(inputs) as data:
      results = {name: np.asarray(exported.call(data[name])) for name in data.files}
    np.savez(outputs, **results)
""")


@pytest.fixture(scope="module")
def tiny_model():
  return tiny_model_and_variables(HEIGHT, WIDTH)


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)


def _embedder(tiny_model, flip=False):
  model, variables = tiny_model
  return inference.Embedder(model, variables, height=HEIGHT, width=WIDTH, flip=flip,
                            source={"workdir": "/runs/x", "checkpoint": "best", "number": 7,
                                    "epoch": 3})


def _check_common_sidecar(sidecar, embedder):
  assert (sidecar["height"], sidecar["width"]) == (HEIGHT, WIDTH)
  assert sidecar["feature_dim"] == embedder.feature_dim == models.feature_dim(10, 8)
  assert sidecar["mean"] == list(augment.IMAGENET_MEAN)
  assert sidecar["std"] == list(augment.IMAGENET_STD)
  assert sidecar["checkpoint"] == {"workdir": "/runs/x", "checkpoint": "best", "number": 7,
                                   "epoch": 3}
  assert sidecar["output_shape"] == ["batch", embedder.feature_dim]
  assert sidecar["flip"] is embedder.flip


def test_stablehlo_export_runs_with_jax_alone(tiny_model, tmp_path):
  embedder = _embedder(tiny_model)
  path = inference.export_stablehlo(embedder, str(tmp_path / "export"))
  assert path == str(tmp_path / "export" / inference.STABLEHLO_FILE)
  inputs = {f"b{n}": _images(n, seed=n) for n in BATCH_SIZES}
  np.savez(tmp_path / "inputs.npz", **inputs)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _RUN_STABLEHLO, path, str(tmp_path / "inputs.npz"),
                  str(tmp_path / "outputs.npz")], check=True, env=env, cwd=str(tmp_path),
                 timeout=300)
  with np.load(tmp_path / "outputs.npz") as outputs:
    for name, images in inputs.items():
      got, want = outputs[name], embedder.embed(images)
      assert got.shape == want.shape == (len(images), embedder.feature_dim)
      assert np.abs(got - want).max() <= 1e-4, name

  with open(path + ".json") as f:
    sidecar = json.load(f)
  _check_common_sidecar(sidecar, embedder)
  assert sidecar["format"] == "stablehlo" and sidecar["file"] == inference.STABLEHLO_FILE
  assert sidecar["input_layout"] == "NHWC" and sidecar["input_dtype"] == "uint8"
  assert sidecar["input_shape"] == ["batch", HEIGHT, WIDTH, 3]
  assert sidecar["input_value_range"] == [0, 255] and sidecar["normalization_included"]
  assert set(sidecar["platforms"]) == {"cpu", "cuda"}


def test_stablehlo_export_with_flip_and_float_input(tiny_model, tmp_path):
  embedder = _embedder(tiny_model, flip=True)
  path = inference.export_stablehlo(embedder, str(tmp_path), input_dtype="float32",
                                    platforms=("cpu",))
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  images = _images(3, seed=9)
  got = np.asarray(exported.call(images.astype(np.float32)))
  assert np.abs(got - embedder.embed(images)).max() <= 1e-4
  with pytest.raises(ValueError, match="input_dtype"):
    inference.export_stablehlo(embedder, str(tmp_path), input_dtype="float16")


def test_onnx_export_matches_the_model_in_onnxruntime(tiny_model, tmp_path):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  embedder = _embedder(tiny_model)
  out = str(tmp_path / "onnx" / "reid.onnx")
  assert inference.export_onnx(embedder, out) == out
  session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  (feed,) = session.get_inputs()
  assert feed.name == "images" and feed.type == "tensor(float)"
  assert feed.shape[1:] == [3, HEIGHT, WIDTH] and not isinstance(feed.shape[0], int)
  assert [o.name for o in session.get_outputs()] == ["features"]
  for n in BATCH_SIZES:
    images = _images(n, seed=10 + n)
    (got,) = session.run(None, {"images": inference.onnx_input(images)})
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
  assert sidecar["opset"] == inference.ONNX_OPSET
  import onnx

  assert max(o.version for o in onnx.load(out).opset_import
             if o.domain in ("", "ai.onnx")) == inference.ONNX_OPSET


def test_onnx_input_is_the_test_transform_transposed():
  images = _images(2, seed=4)
  x = inference.onnx_input(images)
  assert x.shape == (2, 3, HEIGHT, WIDTH) and x.dtype == np.float32
  mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
  want = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(x, want, atol=1e-5)
