"""Checkpoint save/restore round trip and the latest/best preservation policy."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging as absl_logging

from ccreid_jax.checkpoint import Checkpointer
from ccreid_jax.run import CheckpointNameError, CheckpointRef, Run


def _run_of(ckpt: Checkpointer) -> Run:
  """The run folder whose checkpoints ``ckpt`` writes."""
  return Run(str(ckpt.directory) + "-run", checkpoints_dir=ckpt.directory)


def _state(seed: int):
  rng = np.random.default_rng(seed)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
    "gem": {"p": jnp.asarray([3.0 + seed], jnp.float32)},
  }
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  _, opt_state = tx.update(params, opt_state, params)  # non-trivial moments
  return {
    "params": params,
    "opt_state": opt_state,
    "labels": jnp.asarray(rng.integers(-1, 5, size=11), jnp.int32),
    "step": jnp.int32(7 * seed),
  }


def test_round_trip_restores_every_leaf_exactly(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  state = _state(1)
  ckpt.save(1, state, {"epoch": 0, "memory_bucket": 64})
  ckpt.wait_until_finished()
  restored = ckpt.restore(1, jax.eval_shape(lambda: _state(0)))
  assert restored.number == 1
  assert restored.meta == {"epoch": 0, "memory_bucket": 64}
  flat_a, tree_a = jax.tree_util.tree_flatten(state)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored.state)
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_and_best_map(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  maps = {1: None, 2: 0.40, 3: None, 4: 0.55, 5: 0.50, 6: None}
  for number, value in maps.items():
    meta = {"epoch": number - 1}
    if value is not None:
      meta["metrics"] = {"mAP": value}
    ckpt.save(number, _state(number), meta)
  ckpt.wait_until_finished()
  assert ckpt.numbers() == [4, 6]
  assert ckpt.best() == 4 and ckpt.latest() == 6
  run = _run_of(ckpt)
  assert run.find(run.reference("best")) == 4
  assert run.find(run.reference("latest")) == 6
  assert run.find(run.reference("4")) == 4
  restored = ckpt.restore(run.find(run.reference("best")), jax.eval_shape(lambda: _state(0)))
  assert float(restored.state["params"]["gem"]["p"][0]) == 7.0
  with pytest.raises(FileNotFoundError, match="kept"):
    run.find(run.reference(3))


def test_missing_checkpoints_give_a_clear_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "empty"))
  run = _run_of(ckpt)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    run.find(run.reference("latest"))
  ckpt.save(1, _state(1), {"epoch": 0})
  ckpt.wait_until_finished()
  run = _run_of(ckpt)  # a fresh reader sees the new checkpoint
  with pytest.raises(FileNotFoundError, match="No evaluated checkpoint"):
    run.find(run.reference("best"))
  with pytest.raises(ValueError, match="latest"):
    run.reference("newest")


def test_unknown_checkpoint_name_lists_every_accepted_form(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  for number in (1, 2):
    ckpt.save(number, _state(number), {"epoch": number - 1})
  ckpt.wait_until_finished()
  with pytest.raises(CheckpointNameError) as info:
    _run_of(ckpt).reference("bset")
  message = str(info.value)
  for text in (
    "'bset'",
    "'latest'",
    "'best'",
    "'init'",
    "a checkpoint number",
    "checkpoint folder",
    "kept: 2",
    str(tmp_path / "ckpt" / "2"),
    "did you mean 'best'",
  ):
    assert text in message, text


def test_read_only_checkpointer_does_not_warn(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(1), {"epoch": 0})
  ckpt.wait_until_finished()
  ckpt.close()
  with caplog.at_level(logging.INFO):
    reader = Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    assert reader.numbers() == [1]
    absl_logging.warning("another warning")  # only orbax's read-only notice is silenced
  assert "read only" not in caplog.text
  assert "another warning" in caplog.text


def test_one_parser_for_every_checkpoint_name(tmp_path):
  folder = tmp_path / "other" / "checkpoints" / "3"
  folder.mkdir(parents=True)
  assert CheckpointRef.parse("best") == CheckpointRef(kind="best")
  assert CheckpointRef.parse("latest").kind == "latest"
  assert CheckpointRef.parse("init").kind == "init"
  assert CheckpointRef.parse("12") == CheckpointRef(kind="number", number=12)
  assert CheckpointRef.parse(7) == CheckpointRef(kind="number", number=7)
  assert CheckpointRef.parse(str(folder)) == CheckpointRef(kind="folder", folder=str(folder))
  for name in ("best", "latest", "init", "12", str(folder)):
    assert str(CheckpointRef.parse(name)) == name
  with pytest.raises(CheckpointNameError, match="not a checkpoint"):
    CheckpointRef.parse("twelve")
  with pytest.raises(CheckpointNameError, match="no such checkpoint folder"):
    CheckpointRef.parse(str(tmp_path / "missing" / "3"))


def test_a_checkpoint_folder_resolves_in_its_own_run(tmp_path):
  other = Run(str(tmp_path / "other"))
  ckpt = other.checkpointer()
  for number in (1, 2):
    ckpt.save(number, _state(number), {"epoch": number - 1, "metrics": {"mAP": 0.3 - 0.1 * number}})
  ckpt.wait_until_finished()
  here = Run(str(tmp_path / "here"))
  found = here.resolve(str(tmp_path / "other" / "checkpoints" / "1"), config=None)
  assert (found.number, found.epoch, found.label) == (1, 0, "1")
  assert found.run.path == str(tmp_path / "other")
  assert found.name == str(tmp_path / "other" / "checkpoints" / "1")
  latest = other.resolve("latest", config=None)
  assert (latest.number, latest.epoch, latest.run.path) == (2, 1, other.path)
  initial = here.resolve("init", config=None)
  assert (initial.number, initial.epoch, initial.label, initial.is_initial) == (0, -1, "init", True)
