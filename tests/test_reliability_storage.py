"""A full disk or a read-only destination: one line naming the path, never a traceback, and
the saved checkpoints intact (issue 38, item 7).

Tests run as root, where a read-only mode does not stop writes: the refusals are injected
(``OSError(errno.ENOSPC)`` / ``EROFS`` at the write).
"""

import builtins
import errno
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax import commands, main, reporting, train, utils
from ccreid_jax import errors as errors_lib
from ccreid_jax import run as run_lib
from ccreid_jax.checkpoint import Checkpointer
from ccreid_jax.data.datasets import load_dataset
from ccreid_jax.errors import StorageError

from conftest import tiny_config


def _refuse(monkeypatch, module, code=errno.ENOSPC, where=""):
  """Makes ``open`` in ``module`` fail with ``code`` for paths containing ``where``."""
  real_open = builtins.open

  def fake_open(path, *args, **kwargs):
    if where in os.fspath(path):
      raise OSError(code, os.strerror(code), os.fspath(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_a_refused_write_is_one_line_naming_the_path_and_leaves_no_temporary_file(
  tmp_path, monkeypatch
):
  _refuse(monkeypatch, utils)
  path = str(tmp_path / "out" / "a.json")
  with pytest.raises(StorageError) as info:
    utils.write_json(path, {"a": 1})
  assert str(info.value) == (
    f"cannot write {path}: No space left on device. Free some space "
    "there (or make the folder writable), then run the command again."
  )
  assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
  assert os.listdir(tmp_path / "out") == []
  assert main.exit_code_of(info.value) == 1
  # Other errors are not storage errors: they keep their type.
  monkeypatch.undo()
  with pytest.raises(IsADirectoryError):
    utils.write_json(str(tmp_path), {})


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
  state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state, {"epoch": 0})
  ckpt.wait_until_finished()

  def full(*args, **kwargs):  # orbax raises its own error around the OSError of a write.
    try:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "2"))
    except OSError as exc:
      raise RuntimeError("a long orbax error") from exc

  monkeypatch.setattr(ckpt._manager, "save", full)
  with pytest.raises(StorageError) as info:
    ckpt.save(2, state, {"epoch": 1})
  text = str(info.value)
  assert text.startswith(f"cannot write checkpoint 2 into {ckpt.directory}: No space left")
  assert "checkpoints saved before it (1) are intact" in text
  assert "resume from checkpoint 1" in text and "\n" not in text
  assert info.value.__cause__ is None  # no orbax traceback behind it
  restored = ckpt.restore(1, jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored.state["w"], np.arange(4.0))


def test_an_unwritable_rank_list_picture_is_a_warning(tiny_market, tmp_path, monkeypatch, caplog):
  config = tiny_config(tiny_market)
  dataset = load_dataset("market1501", tiny_market)
  data = types.SimpleNamespace(eval_dataset=dataset)
  distmat = np.random.default_rng(0).random((len(dataset.query), len(dataset.gallery)))
  _refuse(monkeypatch, utils, errno.EROFS)
  image = reporting.save_rank_list(config, str(tmp_path), data, distmat, name="eval_1")
  assert image is not None and os.listdir(tmp_path) == []
  assert "the rank-list picture was not written: cannot write" in caplog.text
  assert "ranklist_eval_1.png: Read-only file system" in caplog.text


def test_unwritable_export_and_sweep_destinations_are_refused_before_loading(
  tiny_market, tmp_path, monkeypatch
):
  """Nothing is loaded (the workdir holds no run): the destination is refused first."""
  config = tiny_config(tiny_market)
  _refuse(monkeypatch, errors_lib, errno.EROFS, where=".ccreid-write-test")
  out = str(tmp_path / "hlo")
  with pytest.raises(
    StorageError,
    match=f"cannot write the export folder {out}: Read-only file system. Make it writable",
  ):
    commands.export(config, str(tmp_path / "run"), "stablehlo", out, checkpoint="init")
  out = str(tmp_path / "sweep")
  with pytest.raises(
    StorageError, match=f"cannot write the sweep's --out folder {out}: Read-only file system"
  ):
    commands.sweep(config, str(tmp_path / "run"), [0.5], checkpoint="latest", out=out)


def test_a_full_disk_at_an_export_is_one_line(tmp_path, monkeypatch):
  from ccreid_jax import export as export_lib
  from ccreid_jax import inference

  from tiny_model import tiny_model_and_variables

  model, variables = tiny_model_and_variables(32, 16)
  embedder = inference.Embedder(model, variables, height=32, width=16)
  _refuse(monkeypatch, utils, errno.ENOSPC, where="model.stablehlo")
  out = str(tmp_path / "hlo")
  with pytest.raises(StorageError, match=f"cannot write {out}/model.stablehlo: No space"):
    export_lib.export_stablehlo(embedder, out)
  assert os.listdir(out) == []


@pytest.mark.slow
def test_a_run_stopped_by_a_full_disk_at_a_checkpoint_resumes(tiny_market, tmp_path, monkeypatch):
  """The save of checkpoint 2 fails: one StorageError; checkpoint 1 is intact and the same
  command resumes from it, giving the uninterrupted run's records."""
  config = tiny_config(tiny_market)
  workdir = str(tmp_path / "run")
  real_save = Checkpointer.save

  def save(self, number, state, meta):
    if number == 2:
      with self._storage_errors(f"checkpoint {number}"):  # where save converts orbax's errors
        raise OSError(errno.ENOSPC, "No space left on device")
    real_save(self, number, state, meta)

  monkeypatch.setattr(Checkpointer, "save", save)
  with pytest.raises(StorageError, match="checkpoints saved before it \\(1\\) are intact"):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  train.train_and_evaluate(config, workdir)
  resumed = run_lib.Run(workdir).epoch_records()
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  whole = run_lib.Run(str(tmp_path / "whole")).epoch_records()
  keys = ("epoch", "clusters", "outliers", "loss", "steps", "mAP")
  assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
