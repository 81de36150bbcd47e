"""Bad configs and workdirs: validate_config, Run.check_config, the metrics history."""

import json
import math
import os

import pytest

from ccreid_jax import run as run_lib
from ccreid_jax import validation
from ccreid_jax.run import Run, WorkdirConfigMismatch
from ccreid_jax.validation import ConfigError, validate_config

from conftest import tiny_config


@pytest.fixture
def config(tmp_path):
  return tiny_config(str(tmp_path))  # tmp_path exists: a valid data.root.


def _problems(config, num_devices=1) -> list[str]:
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=num_devices)
  assert str(info.value).count("\n") == len(info.value.problems)  # one line each
  return info.value.problems


def test_default_and_tiny_configs_are_valid(config):
  validate_config(config, num_devices=1)
  validate_config(config, num_devices=4)
  ref = validation.default_config()
  ref.data.root = config.data.root
  validate_config(ref, num_devices=8)


def test_unknown_field_names_it_and_suggests(config):
  with config.unlocked():
    config.train.batchsize = 64
  (problem,) = _problems(config)
  assert "config.train.batchsize: unknown field" in problem
  assert "did you mean config.train.batch_size" in problem


def test_wrong_types_name_field_and_expected_type(config):
  config.cluster.eps = 1  # an int where a float is expected is fine
  config.cluster.eps = 0.5
  raw = config.to_dict()
  raw["train"]["iters"] = "200"
  raw["model"]["pooling"] = 3
  raw["memory"]["bmw_dynamic_weights"] = 1
  raw["optim"]["lr"] = True
  problems = _problems(raw)
  assert any(p.startswith("config.train.iters = '200': expected int") for p in problems)
  assert any(p.startswith("config.model.pooling = 3: expected str") for p in problems)
  assert any(p.startswith("config.memory.bmw_dynamic_weights = 1: expected bool") for p in problems)
  assert any(p.startswith("config.optim.lr = True: expected int or float") for p in problems)
  assert len(problems) == 4


def test_ints_accepted_where_floats_expected(config):
  raw = config.to_dict()
  raw["optim"]["gamma"] = 1
  raw["cluster"]["eps"] = 0.5
  validate_config(raw, num_devices=1)


@pytest.mark.parametrize(
  "field,value,needle",
  [
    ("cluster.eps", 0.0, "in (0, 1)"),
    ("cluster.eps", 1.0, "absent pairs are 1.0"),
    ("cluster.k1", 0, ">= 1"),
    ("cluster.min_samples", 0, ">= 1"),
    ("memory.temperature", 0.0, "> 0"),
    ("memory.momentum", 1.0, "in [0, 1)"),
    ("memory.momentum", -0.1, "in [0, 1)"),
    ("optim.lr", 0.0, "> 0"),
    ("train.epochs", -1, ">= 0"),
    ("train.iters", 0, ">= 1"),
    ("model.bn_group_size", 0, ">= 1"),
    ("data.height", 8, ">= 16"),  # 16 with model.last_stride=1 (the tiny config is 32x16)
    ("data.width", 15, ">= 16"),
    ("rlcc.alpha", 1.5, "in [0, 1]"),
    ("rlcc.beta", -0.5, "in [0, 1]"),
  ],
)
def test_impossible_values(config, field, value, needle):
  group, name = field.split(".")
  setattr(config[group], name, value)
  (problem,) = [p for p in _problems(config) if p.startswith(f"config.{field} ")]
  assert needle in problem


@pytest.mark.parametrize(
  "field,value,accepted",
  [
    ("model.depth", 44, ["10", "18", "34", "50", "101"]),
    ("model.pooling", "max", ["'gem'", "'avg'"]),
    ("model.dtype", "float64", ["'float32'", "'bfloat16'"]),
    ("cluster.method", "kmeans", ["'dbscan'", "'infomap'"]),
    (
      "data.name",
      "cuhk03",
      ["'market1501'", "'dukemtmcreid'", "'msmt17'", "'veri776'", "'personx'"],
    ),
  ],
)
def test_unknown_names_list_accepted_values(config, field, value, accepted):
  group, name = field.split(".")
  setattr(config[group], name, value)
  (problem,) = _problems(config)
  assert problem.startswith(f"config.{field} = {value!r}: unknown value; accepted:")
  assert all(a in problem for a in accepted)


def test_image_side_follows_the_total_stride(config):
  config.model.last_stride = 2
  (problem,) = _problems(config)  # width 16 < 32 = 16 * last_stride
  assert problem.startswith("config.data.width = 16: must be >= 32")


def test_batch_must_split_into_instances_and_devices(config):
  config.train.batch_size = 30  # num_instances 4
  problems = _problems(config, num_devices=4)
  assert len(problems) == 2
  assert "multiple of config.train.num_instances=4" in problems[0]
  assert "multiple of the device count (4)" in problems[1]
  config.train.batch_size = 36
  (problem,) = _problems(config, num_devices=8)
  assert "device count (8)" in problem
  validate_config(config, num_devices=None)  # evaluation: no device check


def test_k2_above_k1(config):
  config.cluster.k1, config.cluster.k2 = 5, 6
  (problem,) = _problems(config)
  assert problem.startswith("config.cluster.k2 = 6: must be <= config.cluster.k1=5")


def test_missing_dataset_root_says_how_to_set_it(config, tmp_path):
  config.data.root = str(tmp_path / "nowhere")
  (problem,) = _problems(config)
  assert str(tmp_path / "nowhere") in problem
  assert "--config.data.root=" in problem and "Market-1501-v15.09.15/" in problem


def test_all_problems_reported_together(config, tmp_path):
  config.cluster.eps = 2.0
  config.cluster.k2 = 40
  config.memory.temperature = -1.0
  config.model.depth = 7
  config.data.root = str(tmp_path / "nowhere")
  with config.unlocked():
    config.extra = 1
  problems = _problems(config)
  assert len(problems) == 6
  fields = sorted(p.split(" ")[0].rstrip(":") for p in problems)
  assert fields == [
    "config.cluster.eps",
    "config.cluster.k2",
    "config.data.root",
    "config.extra",
    "config.memory.temperature",
    "config.model.depth",
  ]


# ---------------------------------------------------------------------------------------
# The config saved with a run.
# ---------------------------------------------------------------------------------------


def _fake_checkpoint(workdir):
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))


def test_new_workdir_saves_the_config(config, tmp_path):
  workdir = str(tmp_path / "run")
  Run(workdir).check_config(config, force=False)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["cluster"]["eps"] == config.cluster.eps
  # No checkpoint yet: nothing to protect, a new config simply replaces it.
  config.cluster.eps = 0.5
  Run(workdir).check_config(config, force=False)


def test_resume_with_neutral_changes_is_allowed(config, tmp_path):
  workdir = str(tmp_path / "run")
  Run(workdir).check_config(config, force=False)
  _fake_checkpoint(workdir)
  config.train.epochs += 5  # extending a run
  config.eval.batch_size = 16
  config.log.progress = True
  config.data.root = str(tmp_path / "moved")
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.num_workers = 1
  config.train.eval_every = 3
  Run(workdir).check_config(config, force=False)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["epochs"] == config.train.epochs  # the saved one follows


def test_resume_with_result_changes_is_refused(config, tmp_path):
  workdir = str(tmp_path / "run")
  Run(workdir).check_config(config, force=False)
  _fake_checkpoint(workdir)
  old_eps, old_lr = config.cluster.eps, config.optim.lr
  config.cluster.eps = 0.5
  config.optim.lr = 1e-3
  config.seed = 7
  with pytest.raises(WorkdirConfigMismatch) as info:
    Run(workdir).check_config(config, force=False)
  message = str(info.value)
  assert f"cluster.eps: {old_eps!r} -> 0.5" in message
  assert f"optim.lr: {old_lr!r} -> 0.001" in message
  assert "seed: 1 -> 7" in message
  assert "--force" in message and "--workdir" in message
  assert [d[0] for d in info.value.differences] == ["cluster.eps", "optim.lr", "seed"]
  # --force resumes with the new config and keeps the old one.
  Run(workdir).check_config(config, force=True)
  with open(os.path.join(workdir, "config.replaced-1.json")) as f:
    assert json.load(f)["cluster"]["eps"] == old_eps
  Run(workdir).check_config(config, force=False)  # now the saved config matches


def test_field_added_later_counts_as_its_default(config, tmp_path):
  workdir = str(tmp_path / "run")
  Run(workdir).check_config(config, force=False)
  _fake_checkpoint(workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["memory"]["bmw_push"]  # a run saved before the field existed
  with open(path, "w") as f:
    json.dump(saved, f)
  Run(workdir).check_config(config, force=False)  # default 0.2 == 0.2
  with open(path, "w") as f:  # the check saved the full config again; restore the old one
    json.dump(saved, f)
  config.memory.bmw_push = 0.3
  with pytest.raises(WorkdirConfigMismatch, match=r"memory.bmw_push: 0.2 -> 0.3"):
    Run(workdir).check_config(config, force=False)


# ---------------------------------------------------------------------------------------
# metrics.jsonl after crashes.
# ---------------------------------------------------------------------------------------


def _write_lines(workdir, lines):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(lines))


def test_epoch_records_keep_the_last_per_epoch_and_skip_torn_lines(tmp_path):
  workdir = str(tmp_path)

  def rec(**kw):
    return json.dumps(kw) + "\n"

  _write_lines(
    workdir,
    [
      rec(kind="initial", mAP=0.1),
      rec(kind="epoch", epoch=0, loss=1.0),
      rec(kind="epoch", epoch=1, loss=2.0),  # killed before checkpoint 2 was saved
      rec(kind="epoch", epoch=1, loss=2.5),  # redone after the restart
      '{"kind": "epoch", "epo',  # torn by a kill, then appended to
      rec(kind="epoch", epoch=2, loss=float("nan")),
    ],
  )
  records = run_lib.Run(workdir).epoch_records()
  assert [r["epoch"] for r in records] == [0, 1, 2]
  assert records[1]["loss"] == 2.5 and math.isnan(records[2]["loss"])
  assert run_lib.Run(workdir).metrics_lines()[1] == 1
  assert run_lib.Run(str(tmp_path / "none")).epoch_records() == []


def test_prune_metrics_drops_what_a_resumed_run_redoes(tmp_path):
  workdir = str(tmp_path)

  def rec(**kw):
    return json.dumps(kw) + "\n"

  _write_lines(
    workdir,
    [
      rec(kind="initial", mAP=0.1),
      rec(kind="epoch", epoch=0),
      rec(kind="epoch", epoch=1),
      rec(kind="other"),
      '{"torn',
    ],
  )
  assert run_lib.Run(workdir).prune_metrics(start_epoch=1) == 2
  kinds = [(r["kind"], r.get("epoch")) for r in run_lib.Run(workdir).metrics_lines()[0]]
  assert kinds == [("initial", None), ("epoch", 0), ("other", None)]
  assert run_lib.Run(workdir).prune_metrics(start_epoch=1) == 0
  assert run_lib.Run(workdir).prune_metrics(start_epoch=0) == 2
  assert run_lib.Run(workdir).metrics_lines()[0] == [{"kind": "other"}]


def test_processes_other_than_the_first_check_but_never_write(config, tmp_path):
  """``write=False`` (process > 0 of a multi-process run): refuses the same, writes nothing."""
  workdir = str(tmp_path / "run")
  Run(workdir).check_config(config, force=False, write=False)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  Run(workdir).check_config(config, force=False)
  _fake_checkpoint(workdir)
  config.cluster.eps = 0.5
  with pytest.raises(WorkdirConfigMismatch, match="cluster.eps"):
    Run(workdir).check_config(config, force=False, write=False)
  before = sorted(os.listdir(workdir))
  Run(workdir).check_config(config, force=True, write=False)  # nothing renamed or written.
  assert sorted(os.listdir(workdir)) == before
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["cluster"]["eps"] != 0.5


# ---------------------------------------------------------------------------------------
# Clustering sizes against the number of train images (issue 38, item 10).
# ---------------------------------------------------------------------------------------


def test_cluster_sizes_that_the_train_images_cannot_hold_are_refused_before_training(
  tiny_market, tmp_path
):
  """k1 at or above N put everything in one cluster (loss 0 for the whole run, exit 0);
  min_samples above N found no cluster in any epoch. Both are refused once N is known."""
  from ccreid_jax import train
  from ccreid_jax.data.datasets import load_dataset

  n = len(load_dataset("market1501", tiny_market).train)
  config = tiny_config(tiny_market)
  config.cluster.k1 = n
  config.cluster.min_samples = n + 1
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError) as info:
    train.train_and_evaluate(config, workdir)
  text = str(info.value)
  assert f"config.cluster.k1 = {n}: must be below the {n} train images" in text
  assert f"--config.cluster.k1=<at most {n - 1}>" in text
  assert f"config.cluster.min_samples = {n + 1}" in text
  assert f"--config.cluster.min_samples=<at most {n // 2}>" in text
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))

  # The other neighbourhood sizes, where their method uses them; sizes below N pass.
  cluster = tiny_config(tiny_market).cluster
  validation.check_cluster_sizes(cluster, n)
  cluster.distance, cluster.ca_k1_inter = "ca_jaccard", n
  with pytest.raises(ConfigError, match="config.cluster.ca_k1_inter"):
    validation.check_cluster_sizes(cluster, n)
  cluster.method, cluster.infomap_k = "infomap", n + 5
  with pytest.raises(ConfigError, match=f"config.cluster.infomap_k = {n + 5}"):
    validation.check_cluster_sizes(cluster, n)
