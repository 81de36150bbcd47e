"""Feature extraction: the flip test against a manual mirror, and batching with padding."""

import numpy as np
import pytest

from ccreid_jax import models
from ccreid_jax.distributed import make_mesh
from ccreid_jax.extract import extract_features, make_extract_fn

from tiny_model import tiny_model_and_variables

HEIGHT, WIDTH = 32, 16


@pytest.fixture(scope="module")
def tiny_model():
  return tiny_model_and_variables(HEIGHT, WIDTH)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)


def _normalise(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flip_is_the_renormalised_mean_of_image_and_mirror(tiny_model):
  model, variables = tiny_model
  mesh = make_mesh()
  plain = make_extract_fn(model, mesh)
  flipped = make_extract_fn(model, mesh, flip=True)
  images = _images(6)
  f = np.asarray(plain(variables, images), np.float64)
  f_mirror = np.asarray(plain(variables, np.ascontiguousarray(images[:, :, ::-1])), np.float64)
  want = _normalise(0.5 * (f + f_mirror))
  got = np.asarray(flipped(variables, images))
  assert got.shape == f.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  # The random model is not mirror-symmetric: the flip test changes the features.
  assert np.abs(got - f).max() > 1e-3


def test_flip_features_do_not_change_when_the_image_is_mirrored(tiny_model):
  model, variables = tiny_model
  mesh = make_mesh()
  images = _images(4, seed=1)
  mirrored = np.ascontiguousarray(images[:, :, ::-1])
  flipped = make_extract_fn(model, mesh, flip=True)
  np.testing.assert_allclose(
    np.asarray(flipped(variables, mirrored)),
    np.asarray(flipped(variables, images)),
    atol=1e-6,
    rtol=0,
  )
  plain = make_extract_fn(model, mesh)
  assert (
    np.abs(np.asarray(plain(variables, mirrored)) - np.asarray(plain(variables, images))).max()
    > 1e-3
  )


@pytest.mark.parametrize("flip", [False, True])
def test_extract_features_in_padded_batches_equals_one_call(tiny_model, flip):
  model, variables = tiny_model
  mesh = make_mesh()
  extract_fn = make_extract_fn(model, mesh, flip=flip)
  images = _images(7, seed=2)
  got = extract_features(extract_fn, variables, images, mesh=mesh, batch_size=3, progress=False)
  want = np.asarray(extract_fn(variables, images))
  assert got.shape == (7, models.feature_dim(10, 8))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
