"""Feature export: .npz round trip, and the split slicing of a run's image arrays."""

import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccreid_jax import feature_files
from ccreid_jax.data.datasets import Record
from ccreid_jax.distributed import make_mesh
from ccreid_jax.extract import FeatureExtractor, extract_features


def _records(n, offset=0):
  return [
    Record(f"/data/\u00e9t\u00e9/{offset + i:04d}_c{i % 3}.jpg", offset + i // 2, i % 3)
    for i in range(n)
  ]


def test_export_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.standard_normal((7, 5)).astype(np.float64)  # stored as float32
  records = _records(7)
  path = str(tmp_path / "out" / "query.npz")
  feature_files.write_features(path, features, records, "query")

  loaded = feature_files.read_features(path)  # np.load(allow_pickle=False) inside
  assert loaded.split == "query"
  assert loaded.features.dtype == np.float32
  np.testing.assert_array_equal(loaded.features, features.astype(np.float32))
  np.testing.assert_array_equal(loaded.identities, [r.identity for r in records])
  np.testing.assert_array_equal(loaded.cameras, [r.camera for r in records])
  assert loaded.paths.dtype.kind == "U"
  assert loaded.paths.tolist() == [r.path for r in records]
  with np.load(path, allow_pickle=False) as raw:
    assert sorted(raw.files) == ["cameras", "features", "identities", "paths", "split"]


def test_a_file_with_the_old_keys_ids_and_cams_still_reads(tmp_path):
  records = _records(3)
  path = str(tmp_path / "old.npz")
  np.savez(
    path,
    features=np.ones((3, 2), np.float32),
    ids=np.array([r.identity for r in records], np.int64),
    cams=np.array([r.camera for r in records], np.int64),
    paths=np.array([r.path for r in records], np.str_),
    split=np.array("gallery", np.str_),
  )
  loaded = feature_files.read_features(path)
  np.testing.assert_array_equal(loaded.identities, [r.identity for r in records])
  np.testing.assert_array_equal(loaded.cameras, [r.camera for r in records])
  assert loaded.split == "gallery" and loaded.paths.tolist() == [r.path for r in records]


def test_export_keeps_the_given_name_and_rejects_bad_input(tmp_path):
  path = str(tmp_path / "features.bin")
  feature_files.write_features(path, np.zeros((2, 3)), _records(2), "train")
  assert feature_files.read_features(path).split == "train"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["features.bin"]  # no temporary left
  with pytest.raises(ValueError, match="records"):
    feature_files.write_features(path, np.zeros((3, 3)), _records(2), "train")
  with pytest.raises(ValueError, match="split"):
    feature_files.write_features(path, np.zeros((2, 3)), _records(2), "test")
  with pytest.raises(ValueError, match="N, D"):
    feature_files.write_features(path, np.zeros((2,)), _records(2), "train")
  np.savez(str(tmp_path / "other.npz"), features=np.zeros((1, 1)))
  with pytest.raises(ValueError, match="missing"):
    feature_files.read_features(str(tmp_path / "other.npz"))


def test_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
  def refuse(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(feature_files.os, "replace", refuse)
  with pytest.raises(OSError, match="No space left"):
    feature_files.write_features(
      str(tmp_path / "query.npz"), np.zeros((2, 3)), _records(2), "query"
    )
  assert list(tmp_path.iterdir()) == []


def test_output_path_is_checked_before_anything_is_written(tmp_path):
  created = tmp_path / "new" / "sub" / "query.npz"
  feature_files.check_output_path(str(created))  # a missing parent folder is created
  assert created.parent.is_dir() and list(created.parent.iterdir()) == []
  folder = tmp_path / "features"
  folder.mkdir()
  with pytest.raises(
    feature_files.OutputPathError, match=f"{folder} is a folder.*{folder}/query.npz"
  ):
    feature_files.check_output_path(str(folder))
  with pytest.raises(feature_files.OutputPathError):  # write_features checks too, names the path
    feature_files.write_features(str(folder), np.zeros((2, 3)), _records(2), "query")
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(
    feature_files.OutputPathError, match=f"{blocker}/query.npz.*{blocker} is a file"
  ):
    feature_files.check_output_path(str(blocker / "query.npz"))
  if os.path.isdir("/proc"):  # a place nobody can write to, not even root
    with pytest.raises(feature_files.OutputPathError, match="/proc/query.npz.*cannot be written"):
      feature_files.check_output_path("/proc/query.npz")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "features", "new"]
  assert list(folder.iterdir()) == []


def _fake_run(num_train=5, num_query=3, num_gallery=6, with_train=True):
  """The attributes of a RunData that extract_split reads, and an ``extract``; image i is
  filled with value i."""

  def images(start, n):
    return np.arange(start, start + n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 4, 2, 3), np.uint8
    )

  def extract_fn(variables, batch):
    # Feature = (mean pixel value * scale, 1): identifies the image each row came from.
    mean = batch.astype(jnp.float32).mean(axis=(1, 2, 3))
    return jnp.stack([mean * variables["scale"], jnp.ones_like(mean)], axis=1)

  config = ml_collections.ConfigDict({"eval": {"batch_size": 2}})
  dataset = types.SimpleNamespace(
    train=_records(num_train, 100),
    query=_records(num_query, 200),
    gallery=_records(num_gallery, 300),
  )
  mesh = make_mesh()
  jitted = jax.jit(extract_fn)

  def extract(variables, images_, *, desc):
    return extract_features(
      jitted,
      variables,
      images_,
      mesh=mesh,
      batch_size=config.eval.batch_size,
      progress=False,
      desc=desc,
    )

  return types.SimpleNamespace(
    config=config,
    dataset=dataset,
    mesh=mesh,
    progress=False,
    extract_fn=jitted,
    extract=extract,
    train_images=images(100, num_train) if with_train else None,
    test_images=images(0, num_query + num_gallery),
  )


def test_extract_split_slices_query_and_gallery_from_test_images(tmp_path):
  run = _fake_run()
  variables = {"scale": jnp.float32(2.0)}
  for split, expected_values, expected_records in (
    ("query", [0, 1, 2], run.dataset.query),
    ("gallery", [3, 4, 5, 6, 7, 8], run.dataset.gallery),
    ("train", [100, 101, 102, 103, 104], run.dataset.train),
  ):
    features, records = feature_files.extract_split(run, run.extract, variables, split)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features[:, 0], 2.0 * np.array(expected_values))
    np.testing.assert_array_equal(features[:, 1], 1.0)
    assert records == list(expected_records)
    path = str(tmp_path / f"{split}.npz")
    feature_files.write_features(path, features, records, split)
    loaded = feature_files.read_features(path)
    np.testing.assert_array_equal(loaded.features, features)
    assert loaded.paths.tolist() == [r.path for r in expected_records]


def test_extract_split_errors():
  run = _fake_run(with_train=False)
  with pytest.raises(ValueError, match="need_train"):
    feature_files.extract_split(run, run.extract, {"scale": jnp.float32(1.0)}, "train")
  with pytest.raises(ValueError, match="split"):
    feature_files.extract_split(run, run.extract, {"scale": jnp.float32(1.0)}, "test")


def test_extract_split_with_a_real_run(tiny_market, tmp_path):
  """extract_split works on a run's loaded data and extractor; rows follow the records."""
  from ccreid_jax import models
  from ccreid_jax.data import loading

  from conftest import tiny_config

  config = tiny_config(tiny_market)
  data = loading.load_run_data(config, str(tmp_path / "run"), need_train=False)
  model = models.create_model(config.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 16, 3)), train=False)
  extract = FeatureExtractor.create(model, config)
  query, query_records = feature_files.extract_split(data, extract, variables, "query")
  gallery, gallery_records = feature_files.extract_split(data, extract, variables, "gallery")
  assert query_records == list(data.dataset.query)
  assert gallery_records == list(data.dataset.gallery)
  assert query.shape[0] + gallery.shape[0] == data.test_images.shape[0]
  np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, rtol=1e-4)
  # The same rows as extracting query + gallery at once (as the evaluation does).
  both = extract(variables, data.test_images, desc="both")
  np.testing.assert_allclose(np.concatenate([query, gallery]), both, atol=1e-5)
