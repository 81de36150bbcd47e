"""The eps sweep (``python -m ccreid_jax.main --mode sweep``): its figures at every eps equal the
training's own clustering run separately at that eps on the same features; the command line
writes the table, JSON and PNG, and refuses bad values with one clean line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ccreid_jax import commands, pseudo_labels
from ccreid_jax import run as run_lib
from ccreid_jax.data import loading
from ccreid_jax.evaluation import visualize
from ccreid_jax.extract import FeatureExtractor
from ccreid_jax.tools import eps_sweep

from conftest import ROOT, tiny_config

# Radii that span the clusterings of the tiny data's random-init features (from mostly
# outliers to one or two clusters); the camera-aware distance is smaller.
EPS = {
  "jaccard": [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75],
  "ca_jaccard": [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5],
}


def test_parse_eps():
  assert eps_sweep.parse_eps("0.3:0.8:0.05") == [
    0.3,
    0.35,
    0.4,
    0.45,
    0.5,
    0.55,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
  ]
  assert eps_sweep.parse_eps("0.6,0.5, 0.5") == [0.5, 0.6]
  assert eps_sweep.parse_eps("0.55") == [0.55]
  assert eps_sweep.parse_eps("0.5:0.6:0.3") == [0.5]
  for bad, why in (
    ("0.5:1.0:0.1", "1.0 is outside"),
    ("0:0.5:0.1", "0.0 is outside"),
    ("0.5:0.4:0.1", "stop >= start"),
    ("0.1:0.9:0", "step > 0"),
    ("a", "expected start:stop:step"),
    ("0.1:0.2", "expected start:stop:step"),
    ("0.1:0.9:0.0001", "at most 1000"),
  ):
    with pytest.raises(ValueError, match=why):
      eps_sweep.parse_eps(bad)


def test_label_row_by_hand():
  labels = np.array([0, 0, 1, -1, 1, 1, -1, 2, 2, 0])
  identities = np.array([5, 5, 6, 6, 6, 6, 7, 8, 8, 5])
  row = eps_sweep.label_row(labels, 0.5, identities)
  assert (row["clusters"], row["outliers"], row["largest_cluster"]) == (3, 2, 3)
  assert row["outlier_fraction"] == 0.2 and row["largest_share"] == 0.3
  assert 0 < row["ari"] < 1
  assert "ari" not in eps_sweep.label_row(labels, 0.5)
  empty = eps_sweep.label_row(np.full(4, -1), 0.1)
  assert (empty["clusters"], empty["outliers"], empty["largest_share"]) == (0, 4, 0.0)


def _expected_rows(features, data, config, eps_values):
  """The training's clustering (``pseudo_labels.cluster_labels``, its own distance with
  max_distance = eps) at each eps, for the first epoch."""
  rows = []
  for eps in eps_values:
    cluster = config.cluster.copy_and_resolve_references()
    cluster.eps = eps
    labels, _ = pseudo_labels.cluster_labels(features, data.train_cameras, cluster, epoch=0)
    rows.append(eps_sweep.label_row(labels, eps, data.train_identities))
  return rows


def test_sweep_equals_the_clustering_at_each_eps(tiny_market, tmp_path):
  config = tiny_config(tiny_market)
  workdir = str(tmp_path / "run")
  # The features, extracted independently of the sweep.
  data = loading.load_run_data(config, workdir, need_train=True)
  loaded = run_lib.Run(workdir).load_model(config, "init")
  features = np.asarray(
    FeatureExtractor.create(loaded.model, config)(loaded.variables, data.train_images)
  )

  for distance, eps_values in EPS.items():
    config.cluster.distance = distance
    out = str(tmp_path / distance)
    result = commands.sweep(config, workdir, eps_values, checkpoint="init", out=out)
    expected = _expected_rows(features, data, config, eps_values)
    assert result["rows"] == expected
    assert (result["checkpoint"], result["epoch"], result["distance"]) == ("init", -1, distance)
    assert result["num_train"] == data.num_train and result["has_train_identities"]
    assert len({r["clusters"] for r in expected}) >= 3, expected  # a range of clusterings
    assert expected[0]["outliers"] > expected[-1]["outliers"]
    with open(os.path.join(out, "eps_sweep_init.json")) as f:
      assert json.load(f)["rows"] == json.loads(json.dumps(expected))
    with Image.open(os.path.join(out, "eps_sweep_init.png")) as image:
      assert image.size == visualize.CURVES_SIZE
    table = eps_sweep.format_table(result["rows"], eps_values[3]).splitlines()
    assert len(table) == 2 + len(eps_values) and "ARI" in table[0]
    assert [line.endswith("config.cluster.eps") for line in table[2:]] == [
      i == 3 for i in range(len(eps_values))
    ]


def test_the_command_line(tiny_market, tmp_path):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
    "import sys\n"
    f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
    "from conftest import tiny_config\n\n\n"
    "def get_config():\n"
    f"  return tiny_config({tiny_market!r})\n"
  )
  base = [
    sys.executable,
    "-m",
    "ccreid_jax.main",
    "--mode",
    "sweep",
    "--config",
    str(config_file),
    "--workdir",
    str(tmp_path / "run"),
  ]
  env = {k: v for k, v in os.environ.items() if k != "CCREID_TRACEBACK"}
  env["JAX_PLATFORMS"] = "cpu"
  cases = {
    "ok": base + ["--checkpoint", "init", "--eps", "0.5:0.7:0.1", "--out", str(tmp_path / "o")],
    "eps": base + ["--eps", "0.5:1.5:0.1"],
    # The initial model without weights would be a random network: refused as training is.
    "weights": base[:-1]
    + [str(tmp_path / "run_w"), "--checkpoint", "init", "--config.model.pretrained="],
  }
  procs = {
    name: subprocess.Popen(
      args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for name, args in cases.items()
  }
  results = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    results[name] = (proc.returncode, out, err)
  code, out, err = results["ok"]
  assert code == 0, err
  assert "eps sweep of" in out and "0.600 |" in out and "eps_sweep_init.png" in out
  assert sorted(os.listdir(tmp_path / "o")) == ["eps_sweep_init.json", "eps_sweep_init.png"]
  code, _, err = results["eps"]
  assert code == 2 and "Traceback" not in err, err
  assert err.strip().splitlines() == [
    "error: --eps 0.5:1.5:0.1: 1.0 is outside (0, 1); Jaccard distances lie in [0, 1] and "
    "absent pairs are 1.0, so eps >= 1 links every pair"
  ], err
  code, _, err = results["weights"]
  assert code == 2 and "Traceback" not in err, err
  assert "model.pretrained = '': no backbone weights" in err and "pretrained=none" in err, err
  assert os.listdir(tmp_path / "run_w") == [], "nothing is loaded before the check"
  with pytest.raises(ValueError, match="1.0 is outside"):
    eps_sweep.parse_eps("0.5:1.5:0.1")
