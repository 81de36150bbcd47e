"""scripts/bench_recipe.py: the full-recipe projection and the config overrides (no training)."""

import json
import os

import pytest

from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def bench_recipe():
  return load_script("bench_recipe")


_MARKET = os.path.join(ROOT, "configs", "market1501.py")


def _record(epoch, time, **phases):
  return {
    "kind": "epoch",
    "epoch": epoch,
    "time": time,
    **{f"time_{k}": v for k, v in phases.items()},
  }


def test_projection_from_measured_epochs(bench_recipe):
  records = [
    _record(0, 130.0, extract=2.0, cluster=1.0, train=20.0),  # compiles: 30 s of wall
    _record(1, 141.0, extract=1.0, cluster=1.0, train=8.0),  # 11 s
    _record(2, 150.0, extract=1.0, cluster=1.0, train=6.0),  # 9 s
    _record(3, 163.0, extract=1.0, cluster=1.0, train=7.0, eval=3.0),  # 13 s, 3 of them eval
  ]
  p = bench_recipe.project(records, start=100.0, end=165.0, full_epochs=50, eval_every=10)
  assert [e["wall"] for e in p["epochs"]] == [30.0, 11.0, 9.0, 13.0]
  assert [e["eval"] for e in p["epochs"]] == [0.0, 0.0, 0.0, 3.0]
  assert p["startup"] == 30.0
  assert p["steady_epoch"] == 10.0  # median of 11, 9 and 13 - 3
  assert p["eval"] == 3.0
  assert p["tail"] == 2.0
  assert p["evaluations"] == 5
  assert p["projected_total"] == 30.0 + 49 * 10.0 + 5 * 3.0 + 2.0
  assert p["measured_total"] == 65.0


def test_projection_needs_two_epochs(bench_recipe):
  with pytest.raises(ValueError, match="at least 2"):
    bench_recipe.project([_record(0, 1.0)], start=0.0, end=2.0, full_epochs=50, eval_every=10)


@pytest.mark.parametrize(
  "epochs, every, expected", [(50, 10, 5), (15, 5, 3), (7, 5, 2), (3, 10, 1), (1, 1, 1)]
)
def test_number_of_evaluations_matches_the_training_loop(bench_recipe, epochs, every, expected):
  # train_and_evaluate evaluates when (epoch + 1) % eval_every == 0 or at the last epoch.
  assert bench_recipe.num_evaluations(epochs, every) == expected


def test_config_overrides_are_typed_and_checked(bench_recipe):
  config = bench_recipe.load_config(
    _MARKET,
    [
      "train.iters=20",
      "optim.lr=0.001",
      "model.dtype=bfloat16",
      "rlcc.enabled=True",
      "data.name='market1501'",
    ],
  )
  assert config.train.iters == 20 and isinstance(config.train.iters, int)
  assert config.optim.lr == 0.001
  assert config.model.dtype == "bfloat16"
  assert config.rlcc.enabled is True
  assert config.train.batch_size == 256  # untouched fields keep the config's values
  with pytest.raises(SystemExit, match="no field 'train.iter'"):
    bench_recipe.load_config(_MARKET, ["train.iter=2"])
  with pytest.raises(SystemExit, match="FIELD=VALUE"):
    bench_recipe.load_config(_MARKET, ["train.iters"])
  # A recipe name, as ccreid_jax.main's --config takes.
  assert bench_recipe.load_config("msmt17_rlcc", ["train.epochs=3"]).to_dict() == (
    bench_recipe.load_config(
      os.path.join(ROOT, "configs", "msmt17_rlcc.py"), ["train.epochs=3"]
    ).to_dict()
  )


def test_one_epoch_is_refused(bench_recipe):
  with pytest.raises(SystemExit):
    bench_recipe.parse_args(["--epochs", "1"])


def test_a_workdir_holding_a_run_is_refused(bench_recipe, tmp_path):
  # A second timing in the same folder would resume the first run and time nothing.
  (tmp_path / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0}\n')
  with pytest.raises(SystemExit, match="already holds a run"):
    bench_recipe.main(["--config", _MARKET, "--workdir", str(tmp_path)])
  assert not (tmp_path / "data").exists()  # refused before generating anything


def test_main_runs_a_short_recipe_and_projects_the_full_one(bench_recipe, tmp_path, monkeypatch):
  # train_and_evaluate is replaced by a fake that records the config it was given and
  # writes the metrics.jsonl a 2-epoch run writes; the rest of main (dataset, cache,
  # projection from the config's own epochs and eval_every, JSON) runs for real.
  seen = {}

  def fake_train_and_evaluate(config, workdir):
    seen.update(
      epochs=config.train.epochs,
      eval_every=config.train.eval_every,
      root=config.data.root,
      dtype=config.model.dtype,
      iters=config.train.iters,
      progress=config.log.progress,
    )
    start = bench_recipe.time.time()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for epoch, (dt, ev) in enumerate([(5.0, 0.0), (2.0, 0.5)]):
        start += dt
        f.write(json.dumps(_record(epoch, start, train=dt - ev, eval=ev)) + "\n")
    return {"mAP": 0.5}

  monkeypatch.setattr(bench_recipe.train, "train_and_evaluate", fake_train_and_evaluate)
  out = tmp_path / "recipe.json"
  result = bench_recipe.main(
    [
      "--config",
      _MARKET,
      "--epochs",
      "2",
      "--num-train-identities",
      "3",
      "--num-test-identities",
      "2",
      "--images-per-camera",
      "2",
      "2",
      "--workers",
      "1",
      "--dtype",
      "bfloat16",
      "--set",
      "train.iters=7",
      "data.height=32",
      "data.width=16",
      "--workdir",
      str(tmp_path / "run"),
      "--out",
      str(out),
    ]
  )
  assert seen == {
    "epochs": 2,
    "eval_every": 2,
    "root": os.path.join(str(tmp_path / "run"), "data"),
    "dtype": "bfloat16",
    "iters": 7,
    "progress": False,
  }
  assert result["num_train"] == len(
    os.listdir(os.path.join(seen["root"], "Market-1501-v15.09.15", "bounding_box_train"))
  )
  assert os.path.isdir(os.path.join(str(tmp_path / "run"), "cache"))
  p = result["projection"]
  assert (p["full_epochs"], p["evaluations"]) == (50, 5)  # market1501.py's, not the run's
  assert p["eval"] == 0.5 and p["steady_epoch"] == pytest.approx(1.5)
  assert p["projected_total"] == pytest.approx(p["startup"] + 49 * 1.5 + 5 * 0.5 + p["tail"])
  assert json.loads(out.read_text())["projection"] == p
