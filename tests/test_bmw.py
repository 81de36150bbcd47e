"""BMW's memory rewrite (``memory.bmw_update``, ``memory.update_rule = "bmw"``) against numpy.

The numpy side is a loop written from the definition (docs/algorithms.md section 13): the
clusters of the batch in the order of their first sample, one at a time, each seeing the rows
rewritten before it. The jitted scan agrees with it within 1e-5 on the corner cases (a one-sample
cluster, absent clusters, a near-duplicate pair of rows, a cluster whose other rows all have a
negative cosine, padded rows), a simultaneous rewrite does not, and three train steps through
``train.make_train_step`` equal three steps built by hand. The parity test replays the authors'
in-place torch loop (``liu-xb/BMW``, ``reid/gcctrain_v2_weight.py``, ``far-update``).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train_step_reference as reference_step

from ccreid_jax import camera_memory, models, train, validation
from ccreid_jax import memory as mem
from ccreid_jax import run as run_lib
from ccreid_jax import state as state_lib
from ccreid_jax.distributed import make_mesh

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PULL, PUSH = 0.9, 0.2
# The hand-built train step of test_train_step_reference and its helpers.
_ReferenceStep, _step_config = reference_step._ReferenceStep, reference_step._step_config
_leaves64, _assert_leaves_close = reference_step._leaves64, reference_step._assert_leaves_close


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _np_bmw(m, x, y, pull=PULL, push=PUSH, dynamic=True, valid=None, sequential=True):
  """The rewrite as defined, in float64; ``sequential=False`` reads every cluster's hardest
  positive and nearest row from the memory as it was before the batch (the wrong variant)."""
  m = np.asarray(m, np.float64)
  before, out = m.copy(), m.copy()
  x = _unit(np.asarray(x, np.float64))
  for c in dict.fromkeys(np.asarray(y).tolist()):  # order of first appearance
    bank = out if sequential else before
    row = bank[c]
    members = np.flatnonzero(y == c)
    f = x[members[np.argmin(x[members] @ row)]]  # first in batch order on ties
    scores = bank @ row
    if valid is not None:
      scores[~np.asarray(valid)] = -np.inf
    scores[c] = 0.0  # the own row counts as 0
    near = bank[np.argmax(scores)]
    g1, g2 = row - f, row + near
    if dynamic:
      g1, g2 = (1 - row @ f) * g1, (1 + row @ near) * g2
    new = row - pull * g1 - push * g2
    out[c] = new / np.linalg.norm(new)
  return out


_bmw_jit = jax.jit(mem.bmw_update, static_argnames=("pull", "push", "dynamic_weights"))


def _jax_bmw(m, x, y, dynamic=True, valid=None):
  return np.asarray(
    _bmw_jit(
      jnp.asarray(m, jnp.float32),
      jnp.asarray(x, jnp.float32),
      jnp.asarray(y, jnp.int32),
      pull=PULL,
      push=PUSH,
      dynamic_weights=dynamic,
      valid=None if valid is None else jnp.asarray(valid),
    )
  )


def _case(name):
  """``(memory rows, features, labels, valid)``; ``valid`` None: every row is real."""
  rng = np.random.default_rng(sum(map(ord, name)))
  dim = 16
  x = rng.normal(size=(12, dim)) * rng.uniform(0.5, 2.0, size=(12, 1))
  if name == "one_sample_cluster":
    m = _unit(rng.normal(size=(6, dim)))
    y = np.array([2, 0, 0, 5, 2, 0, 2, 1, 0, 2, 0, 1])  # cluster 5 has one sample
  elif name == "absent_clusters":
    m = _unit(rng.normal(size=(9, dim)))
    y = np.array([4, 4, 1, 7, 1, 4, 7, 7, 1, 4, 1, 7])  # 0, 2, 3, 5, 6, 8 absent
  elif name == "near_duplicates":
    m = _unit(rng.normal(size=(6, dim)))
    m[3] = _unit(m[1] + 0.05 * rng.normal(size=dim))  # rows 1 and 3 nearly equal
    y = np.array([1, 4, 3, 1, 3, 4, 1, 3, 0, 1, 3, 4])
  elif name == "all_other_cosines_negative":
    m0 = _unit(rng.normal(size=dim))
    others = rng.normal(size=(5, dim))
    others -= np.outer(others @ m0, m0)
    m = np.concatenate([[m0], _unit(_unit(others) - 0.4 * m0)])
    assert np.all(m[1:] @ m0 < 0)
    y = np.array([0, 2, 0, 4, 2, 0, 4, 2, 0, 0, 4, 2])
  elif name == "padded":
    state = mem.init_memory(_unit(rng.normal(size=(5, dim))), bucket=16)
    m, valid = np.asarray(state.centroids, np.float64), np.asarray(state.valid)
    y = np.array([3, 0, 3, 4, 0, 3, 4, 0, 2, 2, 4, 3])
    return m, x, y, valid
  else:
    raise KeyError(name)
  return m, x, y, None


CASES = [
  "one_sample_cluster",
  "absent_clusters",
  "near_duplicates",
  "all_other_cosines_negative",
  "padded",
]


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_bmw_update_matches_the_loop_transcription(name, dynamic):
  m, x, y, valid = _case(name)
  got = _jax_bmw(m, x, y, dynamic, valid)
  np.testing.assert_allclose(got, _np_bmw(m, x, y, dynamic=dynamic, valid=valid), rtol=0, atol=1e-5)
  present = np.isin(np.arange(len(m)), y)
  np.testing.assert_array_equal(got[~present], m[~present].astype(np.float32))  # untouched
  np.testing.assert_allclose(np.linalg.norm(got[present], axis=1), 1.0, rtol=1e-6)
  assert not np.allclose(got[present], m[present], atol=1e-3)


def test_a_cluster_with_only_negative_cosines_is_pushed_by_itself():
  """The own row's score is 0, not -inf: when every other cosine is negative, c = m."""
  m, x, y, _ = _case("all_other_cosines_negative")
  got = _jax_bmw(m, x, y)[0]
  f = _unit(x)[np.flatnonzero(y == 0)]
  f = f[np.argmin(f @ m[0])]
  # g2 = (1 + <m, m>) (m + m) = 4 m: the push only shrinks m before the renormalisation.
  row = m[0] - PULL * (1 - m[0] @ f) * (m[0] - f) - PUSH * 4.0 * m[0]
  np.testing.assert_allclose(got, row / np.linalg.norm(row), atol=1e-6)
  # With -inf for the own row the nearest other row (negative cosine) would be used instead.
  other = m[1 + np.argmax(m[1:] @ m[0])]
  alt = m[0] - PULL * (1 - m[0] @ f) * (m[0] - f) - PUSH * (1 + m[0] @ other) * (m[0] + other)
  assert not np.allclose(got, alt / np.linalg.norm(alt), atol=1e-3)


def test_rewrite_is_sequential_not_simultaneous():
  """Row 3 is rewritten after its near-duplicate row 1 and sees row 1's new value."""
  m, x, y, _ = _case("near_duplicates")
  got = _jax_bmw(m, x, y)
  simultaneous = _np_bmw(m, x, y, sequential=False)
  np.testing.assert_allclose(got[1], simultaneous[1], atol=1e-5)  # the first one agrees
  assert np.abs(got[3] - simultaneous[3]).max() > 1e-3
  np.testing.assert_allclose(got, _np_bmw(m, x, y), atol=1e-5)


def test_ties_pick_the_first_sample_and_the_lowest_row():
  e = np.eye(4)
  # Row 0 = e0 has cosine 1/sqrt(2) to rows 1 and 2 (different directions): row 1 is chosen.
  m = np.stack([e[0], _unit(e[0] + e[1]), _unit(e[0] + e[2]), -e[0]])
  # Both samples of cluster 0 have cosine 0 to row 0: the first (e3) is its hardest positive.
  x = np.stack([e[3], e[2], e[1]])
  y = np.array([0, 0, 3])
  got = _jax_bmw(m, x, y)
  np.testing.assert_allclose(got, _np_bmw(m, x, y), atol=1e-6)
  row = e[0] - PULL * (e[0] - e[3]) - PUSH * (1 + 2**-0.5) * (e[0] + m[1])
  np.testing.assert_allclose(got[0], row / np.linalg.norm(row), atol=1e-6)


def test_padded_rows_are_never_the_nearest_row():
  m, x, y, valid = _case("padded")
  m[valid.sum() :] = np.tile(m[0], (len(m) - valid.sum(), 1))  # padding that copies row 0
  got = _jax_bmw(m, x, y, valid=valid)
  np.testing.assert_allclose(got, _np_bmw(m, x, y, valid=valid), atol=1e-5)
  np.testing.assert_array_equal(got[~valid], m[~valid].astype(np.float32))
  unmasked = _jax_bmw(m, x, y)  # without the mask a padded copy of row 0 is its nearest
  assert np.abs(unmasked[0] - got[0]).max() > 1e-3


def _memory_settings(update, **fields):
  settings = tiny_config("unused").memory
  settings.update_rule = update
  for key, value in fields.items():
    settings[key] = value
  return settings


def test_update_centroids_dispatches_on_config_memory_update():
  m, x, y, valid = _case("padded")
  state = mem.MemoryState(centroids=jnp.asarray(m, jnp.float32), valid=jnp.asarray(valid))
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  for update, expected in [
    ("momentum", mem.momentum_update(state.centroids, xj, yj, 0.1)),
    ("hard", mem.momentum_update(state.centroids, xj, yj, 0.1, hard=True)),
    ("bmw", _np_bmw(m, x, y, valid=valid)),
  ]:
    new = mem.update_centroids(state, xj, yj, _memory_settings(update))
    assert isinstance(new, mem.MemoryState) and new.valid is state.valid
    np.testing.assert_allclose(np.asarray(new.centroids), expected, atol=1e-5)
  settings = _memory_settings("bmw", bmw_pull=0.7, bmw_push=0.1, bmw_dynamic_weights=False)
  bare = mem.update_centroids(state.centroids, xj, yj, settings)  # an array in, an array out
  np.testing.assert_allclose(np.asarray(bare), _np_bmw(m, x, y, 0.7, 0.1, dynamic=False), atol=1e-5)
  with pytest.raises(ValueError, match="'momentum', 'hard', 'bmw'"):
    mem.update_centroids(state, xj, yj, _memory_settings("ema"))


# ---------------------------------------------------------------------------------------
# Through the train step.
# ---------------------------------------------------------------------------------------


class _BMWReferenceStep(_ReferenceStep):
  """The hand-built step of test_train_step_reference with BMW's rewrite of the memory."""

  def update_memory(self, features, labels):
    settings = self.config.memory
    valid = np.arange(len(self.memory)) < self.num_clusters
    self.memory = _np_bmw(
      self.memory,
      features,
      labels,
      settings.bmw_pull,
      settings.bmw_push,
      settings.bmw_dynamic_weights,
      valid,
    )


def _bmw_step_setup(dynamic=True):
  config = _step_config()
  config.memory.update_rule = "bmw"
  config.memory.bmw_dynamic_weights = dynamic
  model = models.create_model(config.model)
  dim = models.feature_dim(config.model.depth, config.model.width)
  tx = state_lib.make_optimizer(config.optim, config.train.iters)
  rng = np.random.default_rng(17)
  centroids = _unit(rng.normal(size=(reference_step.NUM_CLUSTERS, dim)))
  centroids[3] = _unit(centroids[1] + 0.1 * rng.normal(size=dim))  # a near-duplicate pair
  memory = mem.init_memory(centroids.astype(np.float32), reference_step.BUCKET)
  state = state_lib.create_train_state(model, config, tx=tx, memory=memory)
  return config, model, tx, state, rng


def _batch(rng, config):
  batch = reference_step.BATCH
  images = rng.integers(
    0, 256, size=(batch, config.data.height, config.data.width, 3), dtype=np.uint8
  )
  # Clusters 0, 1, 3 several times, 4 once (a one-sample cluster), 2 absent; shuffled.
  labels = rng.permutation(np.repeat(np.array([0, 1, 3, 4]), [5, 4, 6, 1])).astype(np.int32)
  return images, labels


@pytest.mark.parametrize("dynamic", [True, False])
def test_three_train_steps_equal_a_hand_built_bmw_step(dynamic):
  config, model, _, state, rng = _bmw_step_setup(dynamic)
  reference = _BMWReferenceStep(model, config, state)
  step = train.make_train_step(config, make_mesh())
  for _ in range(3):
    images, labels = _batch(rng, config)
    expected_loss = reference.step(images, labels)
    before = np.asarray(state.memory.centroids)
    state, metrics = step(state, images, labels)
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    _assert_leaves_close(_leaves64(state.params), reference.params, atol=1e-6)
    memory = np.asarray(state.memory.centroids, np.float64)
    np.testing.assert_allclose(memory, reference.memory, rtol=0, atol=1e-5)
    assert not np.allclose(memory, before, atol=1e-3)
    np.testing.assert_array_equal(memory[2], before[2])  # absent
    np.testing.assert_array_equal(memory[reference_step.NUM_CLUSTERS :], 0.0)  # padding


def test_bmw_rewrite_is_the_same_with_soft_targets_and_camera_proxies():
  """RLCC's soft targets and the camera term change the loss, not the rewrite: it uses the
  hard pseudo labels and the step's features, so the first step's memory is the same."""
  config, model, _, state, rng = _bmw_step_setup()
  images, labels = _batch(rng, config)
  reference = _BMWReferenceStep(model, config, state)
  reference.step(images, labels)
  dim = models.feature_dim(config.model.depth, config.model.width)
  cameras = rng.integers(0, 3, size=len(labels)).astype(np.int32)
  proxies, _ = camera_memory.build_camera_proxies(
    _unit(rng.normal(size=(60, dim))).astype(np.float32),
    np.arange(60) % 5,
    rng.integers(0, 3, size=60),
    bucket=32,
  )
  targets = np.zeros((len(labels), reference_step.BUCKET), np.float32)
  targets[np.arange(len(labels)), labels] = 0.6
  targets[:, 2] += 0.4
  mesh = make_mesh()
  for soft, camera in [(False, False), (True, False), (False, True), (True, True)]:
    start = jax.tree_util.tree_map(jnp.copy, state)
    if camera:
      start = start.replace(camera=jax.tree_util.tree_map(jnp.copy, proxies))
    step = train.make_train_step(config, mesh, soft_targets=soft, camera=camera)
    args = (images, labels) + ((cameras,) if camera else ()) + ((targets,) if soft else ())
    new, metrics = step(start, *args)
    assert ("camera_loss" in metrics) is camera
    np.testing.assert_allclose(
      np.asarray(new.memory.centroids, np.float64),
      reference.memory,
      rtol=0,
      atol=1e-5,
      err_msg=f"soft={soft} camera={camera}",
    )


# ---------------------------------------------------------------------------------------
# The config: memory.update_rule replaces memory.hard.
# ---------------------------------------------------------------------------------------


def test_memory_hard_is_refused_with_what_it_became(tmp_path):
  config = tiny_config(str(tmp_path))
  validation.validate_config(config, num_devices=1)
  config.memory.hard = True  # an old config file's spelling
  with pytest.raises(validation.ConfigError) as info:
    validation.validate_config(config, num_devices=1)
  (problem,) = info.value.problems
  assert problem.startswith(
    "config.memory.hard: this field was replaced by config.memory.update_rule"
  )
  assert "--config.memory.update_rule=hard" in problem and '"momentum"' in problem
  config = tiny_config(str(tmp_path))
  config.memory.update_rule = "ema"
  config.memory.bmw_push = -0.1
  with pytest.raises(validation.ConfigError) as info:
    validation.validate_config(config, num_devices=1)
  assert (
    "config.memory.update_rule = 'ema': unknown value; accepted: 'momentum', 'hard', 'bmw'"
  ) in info.value.problems
  assert any(
    p.startswith("config.memory.bmw_push = -0.1: must be >= 0") for p in info.value.problems
  )


def test_memory_hard_on_the_command_line_says_what_it_became(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("CCREID_TRACEBACK", None)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ccreid_jax.main",
      "--config",
      "configs/demo.py",
      "--workdir",
      str(tmp_path / "w"),
      "--config.memory.hard=True",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "--config.memory.hard=True: this field was replaced by config.memory.update_rule" in (
    proc.stderr
  )
  assert "--config.memory.update_rule=hard" in proc.stderr


@pytest.mark.parametrize("hard,update", [(False, "momentum"), (True, "hard")])
def test_a_run_saved_with_memory_hard_resumes_as_memory_update(tmp_path, hard, update):
  config = tiny_config(str(tmp_path))
  saved = json.loads(config.to_json_best_effort())
  for key in ("update_rule", "bmw_pull", "bmw_push", "bmw_dynamic_weights"):
    del saved["memory"][key]  # the config.json of a run saved before BMW
  saved["memory"]["hard"] = hard
  assert run_lib.upgrade_saved_config(saved)["memory"]["update_rule"] == update
  assert "hard" not in run_lib.upgrade_saved_config(saved)["memory"]
  assert saved["memory"]["hard"] is hard  # the input is not changed
  config.memory.update_rule = update
  assert run_lib.config_differences(saved, config) == []
  config.memory.update_rule = "bmw"
  assert run_lib.config_differences(saved, config) == [("memory.update_rule", update, "bmw")]


# ---------------------------------------------------------------------------------------
# Parity: the authors' in-place loop, replayed in torch.
# ---------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", CASES[:-1] + ["ties"])
def test_matches_the_authors_torch_loop(name, dynamic):
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  if name == "ties":
    e = np.eye(4)
    m = np.stack([e[0], _unit(e[0] + e[1]), _unit(e[0] + e[2]), -e[0]])
    x, y = np.stack([e[3], e[2], e[1]]), np.array([0, 0, 3])
  else:
    m, x, y, _ = _case(name)
  bank = torch.tensor(m, dtype=torch.float32)
  feats = functional.normalize(torch.tensor(x, dtype=torch.float32))
  groups = {}
  for feature, label in zip(feats, y.tolist()):  # a dict keeps the first-appearance order
    groups.setdefault(label, []).append(feature)
  for index, members in groups.items():
    members = torch.stack(members)
    f = members[torch.argmin(torch.mm(members, bank[index].unsqueeze(1)).squeeze())]
    similarities = torch.mm(bank, bank[index].unsqueeze(1)).squeeze()
    similarities[index] = 0
    c = bank[torch.argmax(similarities)]
    g1, g2 = bank[index] - f, bank[index] + c
    if dynamic:
      g1, g2 = (1 - bank[index].dot(f)) * g1, (1 + bank[index].dot(c)) * g2
    bank[index] -= PULL * g1 + PUSH * g2
    bank[index] = functional.normalize(bank[index].unsqueeze(0))[0]
  np.testing.assert_allclose(_jax_bmw(m, x, y, dynamic), bank.numpy(), rtol=0, atol=1e-5)
