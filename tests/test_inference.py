"""The inference API: Embedder features equal the evaluation's, paths equal arrays, search
ranks as a brute-force loop does, and the command-line entry points run on a workdir."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ccreid_jax import commands, inference, models
from ccreid_jax import export as export_lib
from ccreid_jax.data.cache import ImageDecodeError, load_image_cache
from ccreid_jax.distributed import make_mesh
from ccreid_jax.evaluation import visualize
from ccreid_jax.extract import extract_features, make_extract_fn

from tiny_model import tiny_model_and_variables

HEIGHT, WIDTH = 32, 16
# Source images of several sizes (height, width), one the model's own (no resize).
SIZES = [(64, 32), (50, 30), (97, 41), (32, 16), (20, 12), (128, 64), (64, 32)]


@pytest.fixture(scope="module")
def tiny_model():
  return tiny_model_and_variables(HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  """Smooth random images of several sizes, as PNG and JPEG files."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(1)
  paths = []
  for i, (h, w) in enumerate(SIZES):
    coarse = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    path = folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
    image.save(path)
    paths.append(str(path))
  return paths


def _decoded(paths):
  arrays = []
  for path in paths:
    with Image.open(path) as image:
      arrays.append(np.asarray(image.convert("RGB")))
  return arrays


@pytest.mark.parametrize("flip", [False, True])
def test_embed_equals_evaluation_features_of_cached_images(tiny_model, image_files, tmp_path, flip):
  model, variables = tiny_model
  # The evaluation: the uint8 cache file, then make_extract_fn in batches.
  cached = load_image_cache(image_files, HEIGHT, WIDTH, str(tmp_path / "cache"), progress=False)
  mesh = make_mesh()
  want = extract_features(
    make_extract_fn(model, mesh, flip=flip),
    variables,
    cached,
    mesh=mesh,
    batch_size=64,
    progress=False,
  )
  embedder = inference.Embedder(
    model, variables, height=HEIGHT, width=WIDTH, flip=flip, batch_size=4
  )
  got = embedder.embed(image_files)
  assert got.shape == (len(image_files), embedder.feature_dim) and got.dtype == np.float32
  assert np.abs(got - want).max() <= 1e-6
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert np.abs(got[0] - got[1]).max() > 1e-3  # the images' features differ


def test_arrays_of_any_size_are_resized_as_the_cache_resizes_files(tiny_model, image_files):
  model, variables = tiny_model
  embedder = inference.Embedder(model, variables, height=HEIGHT, width=WIDTH, batch_size=4)
  arrays = _decoded(image_files)
  assert len({a.shape for a in arrays}) > 3
  from_files = load_image_cache(image_files, HEIGHT, WIDTH, None, progress=False)
  np.testing.assert_array_equal(embedder.load_images(arrays), from_files)

  by_path = embedder.embed(image_files)
  np.testing.assert_array_equal(embedder.embed(arrays), by_path)
  mixed = [p if i % 2 else a for i, (p, a) in enumerate(zip(image_files, arrays))]
  np.testing.assert_array_equal(embedder.embed(mixed), by_path)
  # One path, one image, and a 4-D batch.
  np.testing.assert_array_equal(embedder.embed(image_files[2]), by_path[2:3])
  np.testing.assert_array_equal(embedder.embed(arrays[2]), by_path[2:3])
  np.testing.assert_array_equal(embedder.embed(np.stack([arrays[0], arrays[6]])), by_path[[0, 6]])
  assert embedder.embed([]).shape == (0, embedder.feature_dim)


def test_embed_refuses_what_it_cannot_read(tiny_model, image_files, tmp_path):
  model, variables = tiny_model
  embedder = inference.Embedder(model, variables, height=HEIGHT, width=WIDTH)
  with pytest.raises(inference.InferencePathError, match="is a folder"):
    embedder.embed([str(tmp_path)])
  with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8"):
    embedder.embed([image_files[0], np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="image 0"):
    embedder.embed([np.zeros((8, 8), np.uint8)])
  missing = str(tmp_path / "missing.jpg")
  with pytest.raises(ImageDecodeError, match="missing.jpg"):
    embedder.embed([image_files[0], missing])


def test_search_ranks_as_a_brute_force_loop(tiny_model, image_files):
  model, variables = tiny_model
  embedder = inference.Embedder(model, variables, height=HEIGHT, width=WIDTH, batch_size=4)
  query, gallery = image_files[:3], image_files[1:]
  result = inference.search(embedder, query, gallery, topk=4)
  assert result.indices.shape == result.distances.shape == (3, 4)
  qf, gf = embedder.embed(query), embedder.embed(gallery)
  for i in range(3):
    d = [2.0 - 2.0 * float(np.dot(qf[i].astype(np.float64), g)) for g in gf]
    order = sorted(range(len(gallery)), key=lambda j: (d[j], j))[:4]
    assert result.indices[i].tolist() == order
    np.testing.assert_allclose(result.distances[i], [d[j] for j in order], atol=1e-5)
  # A query that is in the gallery finds itself first, at distance ~0.
  assert result.indices[1, 0] == 0 and result.indices[2, 0] == 1
  assert abs(result.distances[1, 0]) < 1e-5
  # topk larger than the gallery: all of it.
  assert inference.search(embedder, query, gallery, topk=50).indices.shape == (3, 6)
  with pytest.raises(ValueError, match="topk"):
    inference.search(embedder, query, gallery, topk=0)


def test_search_and_draw_records_and_picture(tiny_model, image_files, tmp_path):
  model, variables = tiny_model
  embedder = inference.Embedder(model, variables, height=HEIGHT, width=WIDTH, batch_size=4)
  out = tmp_path / "pics" / "search.png"
  records = inference.search_and_draw(
    embedder, image_files[:2], image_files, topk=3, out_png=str(out)
  )
  result = inference.search(embedder, image_files[:2], image_files, topk=3)
  assert [r["query"] for r in records] == image_files[:2]
  for record, row, dist in zip(records, result.indices, result.distances):
    assert [m["path"] for m in record["matches"]] == [image_files[g] for g in row]
    assert [m["rank"] for m in record["matches"]] == [1, 2, 3]
    np.testing.assert_allclose([m["distance"] for m in record["matches"]], dist)
  with Image.open(out) as picture:
    assert picture.size == visualize.rank_list_size(2, 3)
  text = inference.format_search_results(records)
  assert text.splitlines()[0] == f"query {image_files[0]}"
  assert len(text.splitlines()) == 2 * 4 and image_files[result.indices[1, 2]] in text


def test_list_images_is_recursive_sorted_and_filtered(tmp_path):
  for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt"):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"")
  assert inference.list_images(str(tmp_path)) == [
    str(tmp_path / "a.PNG"),
    str(tmp_path / "b.jpg"),
    str(tmp_path / "sub" / "c.jpeg"),
  ]
  (tmp_path / "empty").mkdir()
  with pytest.raises(inference.InferencePathError, match="no image file"):
    inference.list_images(str(tmp_path / "empty"))
  with pytest.raises(inference.InferencePathError, match="not a folder"):
    inference.list_images(str(tmp_path / "b.jpg"))


# ---------------------------------------------------------------------------------------
# A run's workdir: from_workdir, run_search, run_export.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory):
  """A workdir holding only the saved config of a tiny run (its model is the initial one)."""
  from ccreid_jax import run as run_lib

  from conftest import tiny_config

  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(str(tmp_path_factory.mktemp("no_data")))
  config.eval.flip = True
  config.eval.batch_size = 8
  run_lib.Run(workdir).check_config(config, force=False)
  return workdir, config


def test_from_workdir_reads_the_saved_config_and_the_checkpoint(run_workdir, image_files):
  from ccreid_jax import run as run_lib

  workdir, config = run_workdir
  embedder = inference.Embedder.from_workdir(workdir, checkpoint="init")
  assert (embedder.height, embedder.width) == (32, 16)
  assert embedder.flip and embedder.batch_size == 8
  assert embedder.source == {
    "workdir": os.path.abspath(workdir),
    "checkpoint": "init",
    "number": 0,
    "epoch": -1,
  }
  # The variables are the run folder's (features from variables: the tests above).
  loaded = run_lib.Run(workdir).load_model(config, "init")
  assert embedder.model == loaded.model
  jax.tree_util.tree_map(np.testing.assert_array_equal, embedder.variables, loaded.variables)
  assert embedder.embed(image_files[:2]).shape == (2, models.feature_dim(10, 8))


def test_read_config_needs_a_run_folder(tmp_path):
  from ccreid_jax.run import Run

  with pytest.raises(FileNotFoundError, match="config.json"):
    Run(str(tmp_path)).read_config()
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="JSON object"):
    Run(str(tmp_path)).read_config()


def test_run_search_and_run_export(run_workdir, image_files, tmp_path):
  workdir, config = run_workdir
  query = image_files[3]
  gallery = os.path.dirname(image_files[0])
  records, png = commands.search(config, workdir, query, gallery, topk=5, checkpoint="init")
  assert len(records) == 1 and records[0]["query"] == query
  assert records[0]["matches"][0]["path"] == query  # itself, in the folder
  assert len(records[0]["matches"]) == 5
  assert png == os.path.join(workdir, "search_ranklist.png") and os.path.isfile(png)

  summary = commands.export(config, workdir, "stablehlo", str(tmp_path / "hlo"), checkpoint="init")
  assert summary["path"] == str(tmp_path / "hlo" / export_lib.STABLEHLO_FILE)
  with open(summary["sidecar"]) as f:
    sidecar = json.load(f)
  assert sidecar["checkpoint"]["number"] == 0 and sidecar["flip"] is True
  assert (sidecar["height"], sidecar["width"]) == (32, 16)
  with pytest.raises(ValueError, match="'stablehlo' or 'onnx'"):
    commands.export(config, workdir, "tflite", str(tmp_path / "x"), checkpoint="init")
  with pytest.raises(inference.InferencePathError, match="no such image file or folder"):
    commands.search(config, workdir, str(tmp_path / "nothing"), gallery, checkpoint="init")
  with pytest.raises(inference.InferencePathError, match="is a file"):
    commands.export(config, workdir, "stablehlo", summary["path"], checkpoint="init")
  with pytest.raises(inference.InferencePathError, match="is a folder"):
    commands.export(config, workdir, "onnx", str(tmp_path), checkpoint="init")


def test_search_honours_skip_bad_images(run_workdir, image_files, tmp_path, caplog):
  """The error's advice, --config.data.skip_bad_images=True, works (issue 38, item 6)."""
  workdir, config = run_workdir
  gallery = tmp_path / "gallery"
  gallery.mkdir()
  for path in image_files:
    shutil.copy(path, gallery)
  (gallery / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ImageDecodeError, match="skip_bad_images=True"):
    commands.search(
      config,
      workdir,
      image_files[3],
      str(gallery),
      topk=3,
      checkpoint="init",
      out_png=str(tmp_path / "a.png"),
    )
  config = config.copy_and_resolve_references()
  config.data.skip_bad_images = True
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    records, _ = commands.search(
      config,
      workdir,
      str(gallery),
      str(gallery),
      topk=50,
      checkpoint="init",
      out_png=str(tmp_path / "b.png"),
    )
  assert sorted(r["query"] for r in records) == sorted(
    str(gallery / os.path.basename(p)) for p in image_files
  )
  assert all(len(r["matches"]) == len(image_files) for r in records)
  assert all("broken.jpg" not in m["path"] for r in records for m in r["matches"])
  assert "skipped 1 unreadable gallery image(s)" in caplog.text
  assert "skipped 1 unreadable query image(s)" in caplog.text
  # Without a config, the advice names the Python way out too.
  with pytest.raises(ImageDecodeError, match="Embedder.embed_readable"):
    inference.Embedder.from_workdir(workdir, "init").embed([str(gallery / "broken.jpg")])


# ---------------------------------------------------------------------------------------
# Exports never replace a run's files or an existing export unasked (issue 38, item 5).
# ---------------------------------------------------------------------------------------


def _tree_state(folder):
  return {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(folder)
    for f in files
  }


def test_export_never_replaces_a_runs_files_and_replaces_an_export_only_when_asked(
  run_workdir, tmp_path
):
  from ccreid_jax.run import Run

  workdir, config = run_workdir
  before = _tree_state(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  # --out <workdir>/config: its sidecar would be <workdir>/config.json.
  with pytest.raises(inference.InferencePathError) as info:
    commands.export(config, workdir, "onnx", os.path.join(workdir, "config"), checkpoint="init")
  config_json = os.path.join(workdir, "config.json")
  assert f"would write {config_json}, one of the files of the run in {workdir}" in str(info.value)
  assert "e.g. " + os.path.join(workdir, "model.onnx") in str(info.value)
  for fmt, out in (
    ("onnx", os.path.join(workdir, "config")),
    ("onnx", os.path.join(workdir, "metrics.jsonl")),
    ("stablehlo", os.path.join(workdir, "checkpoints")),
    ("stablehlo", os.path.join(workdir, "tensorboard", "x")),
  ):
    with pytest.raises(inference.InferencePathError, match="never replaces a run's files"):
      commands.export(config, workdir, fmt, out, checkpoint="init", overwrite=True)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved
  assert _tree_state(workdir) == before
  # Another run's folder above --out is protected as well, also from the library functions.
  other = tmp_path / "other_run"
  Run(str(other)).save_config(config)
  with pytest.raises(inference.InferencePathError, match="one of the files of the run in"):
    export_lib.check_export_paths("onnx", str(other / "config"), overwrite=True)
  run = Run(workdir)
  assert run.owns(os.path.join(workdir, "checkpoints", "3", "state"))
  assert run.owns(os.path.join(workdir, "eval_3.json")) and run.owns(run.metrics_path)
  assert not run.owns(os.path.join(workdir, "model.onnx")) and not run.owns(workdir)
  assert not run.owns(str(tmp_path / "config.json"))

  # An existing export (or only its sidecar) is replaced only with overwrite.
  out = str(tmp_path / "hlo")
  first = commands.export(config, workdir, "stablehlo", out, checkpoint="init")
  written = _tree_state(out)
  with pytest.raises(inference.InferencePathError) as info:
    commands.export(config, workdir, "stablehlo", out, checkpoint="init")
  assert f"{first['path']} and {first['sidecar']} already exist" in str(info.value)
  assert "--overwrite" in str(info.value) and _tree_state(out) == written
  commands.export(config, workdir, "stablehlo", out, checkpoint="init", overwrite=True)
  assert _tree_state(out) != written
  (tmp_path / "m.onnx.json").write_text("{}")
  with pytest.raises(inference.InferencePathError, match=r"m\.onnx\.json already exists"):
    export_lib.check_export_paths("onnx", str(tmp_path / "m.onnx"))


def test_evaluation_refuses_a_config_json_that_is_not_a_run_config(run_workdir, tmp_path):
  """An export's sidecar written over config.json (as --out <workdir>/config did) is named,
  instead of evaluating with the given config's image size."""
  import shutil

  from ccreid_jax import main
  from ccreid_jax.run import Run, RunConfigError, WorkdirConfigMismatch

  workdir = str(tmp_path / "run")
  shutil.copytree(run_workdir[0], workdir)
  config = run_workdir[1]
  sidecar = {
    "format": "onnx",
    "file": "config",
    "height": 32,
    "width": 16,
    "input_layout": "NCHW",
    "feature_dim": 64,
  }
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(sidecar, f)
  path = os.path.join(workdir, "config.json")
  for call in (
    lambda: Run(workdir).read_config(),
    lambda: Run(workdir).with_model_settings(config),
    lambda: inference.Embedder.from_workdir(workdir),
    lambda: commands.evaluate(config, workdir),
  ):
    with pytest.raises(RunConfigError) as info:
      call()
    message = str(info.value)
    assert f"{path} is not the config of a ccreid_jax run" in message
    assert "the sidecar of a 'onnx' export of 'config'" in message
  assert main.exit_code_of(info.value) == 1
  # Resuming training: a changed field; --force keeps the file and saves the new config.
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  with pytest.raises(WorkdirConfigMismatch, match="config.json: \"not a run's config"):
    Run(workdir).check_config(config, force=False)
  Run(workdir).check_config(config, force=True)
  with open(os.path.join(workdir, "config.replaced-1.json")) as f:
    assert json.load(f) == sidecar
  assert Run(workdir).read_config().data.height == config.data.height
