"""A whole multi-process run: ``train_and_evaluate`` + ``evaluate`` in two CPU processes.

Two processes x 2 CPU devices (gloo collectives) on localhost share one workdir; the run must
equal a 1-process, 4-device run epoch for epoch, resume, and evaluate from its checkpoint.
(A separate file from test_distributed.py so that pytest-xdist can run the two slow
multi-process tests on different workers.)
"""

import json
import os
import sys

import pytest

from conftest import ROOT
from multiprocess import run_processes

# A whole run through the public entry points, in every process: train (or resume) into a
# shared workdir, then evaluate its latest checkpoint.
_TRAIN_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
from ccreid_jax import commands
from ccreid_jax import distributed
distributed.maybe_initialize(initialization_timeout=120)
from conftest import tiny_config  # also sets up the compilation cache (not for 2 processes)
from ccreid_jax import train
config = tiny_config({data_root!r})
config.train.epochs = {epochs}
config.log.ranklist_queries = 2
results = train.train_and_evaluate(config, {workdir!r})
evaluated = commands.evaluate(config, {workdir!r}, checkpoint="latest")
print(json.dumps({{"process": jax.process_index(), "processes": jax.process_count(),
                  "results": results, "evaluated": evaluated}}))
"""


def _train_script(data_root: str, workdir: str, epochs: int) -> list[str]:
  code = _TRAIN_SCRIPT.format(
    root=ROOT,
    tests=os.path.join(ROOT, "tests"),
    data_root=data_root,
    workdir=workdir,
    epochs=epochs,
  )
  return [sys.executable, "-c", code]


def _epoch_records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


@pytest.mark.slow
def test_two_process_run_trains_checkpoints_resumes_and_evaluates(tiny_market, tmp_path):
  """``train_and_evaluate`` + ``evaluate`` in 2 processes x 2 devices on one shared workdir.

  Equals a 1-process, 4-device run epoch for epoch; only process 0 writes the metrics, the
  config and the pictures (one record per epoch, not one per process); the orbax checkpoint
  written by both processes resumes a longer run and evaluates to the logged metrics.
  """
  shared, single = str(tmp_path / "two"), str(tmp_path / "one")
  two = run_processes(2, 2, _train_script(tiny_market, shared, epochs=2))
  one = run_processes(1, 4, _train_script(tiny_market, single, epochs=2))[0]
  assert sorted(r["process"] for r in two) == [0, 1] and two[0]["processes"] == 2
  assert one["processes"] == 1
  assert two[0]["results"]["mAP"] == pytest.approx(one["results"]["mAP"], abs=1e-4)
  assert two[0]["results"] == two[1]["results"]  # every process computes the same metrics.
  two_records, one_records = _epoch_records(shared), _epoch_records(single)
  assert [r["epoch"] for r in two_records] == [0, 1]  # written once, by process 0.
  assert [r["epoch"] for r in one_records] == [0, 1]
  assert all(r["clusters"] > 0 for r in one_records), "an epoch trained nothing"
  for a, b in zip(two_records, one_records):
    assert (a["clusters"], a["outliers"], a["steps"]) == (b["clusters"], b["outliers"], b["steps"])
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-4)
  for name in ("config.json", "curves.png", "ranklist_epoch1.png", "eval_2.json"):
    assert os.path.exists(os.path.join(shared, name)), name
  for r in two:  # the checkpoint both processes wrote evaluates to what training logged.
    assert r["evaluated"]["mAP"] == pytest.approx(two_records[-1]["mAP"], abs=1e-6)
    assert r["evaluated"]["checkpoint"] == 2

  # Resume the shared run for one more epoch, again in two processes.
  resumed = run_processes(2, 2, _train_script(tiny_market, shared, epochs=3))
  records = _epoch_records(shared)
  assert [r["epoch"] for r in records] == [0, 1, 2]
  assert records[:2] == two_records  # the finished epochs are kept, not redone.
  assert records[2]["steps"] == 3 * records[0]["steps"]
  for r in resumed:
    assert r["evaluated"]["checkpoint"] == 3
    assert r["evaluated"]["mAP"] == pytest.approx(records[2]["mAP"], abs=1e-6)
