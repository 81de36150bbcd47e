"""Camera-aware training on camera-shifted data, and the memory's update rules.

  python scripts/bench_camera.py --seeds 1 2 3 [--epochs 8] [--iters 30] [--out camera.json]
  python scripts/bench_camera.py --variants plain hard bmw --seeds 1 2 3 --epochs 10 --iters 30
  python scripts/bench_camera.py --data demo --variants plain hard bmw --seeds 1 2 3

Generates a Market-1501-layout dataset in which every camera has a strong appearance of its
own (``synthetic.generate_market_dataset(camera_shift=1.0)``: colour cast, exposure, haze,
background, blur or noise per camera; 60 train identities, 6 cameras), then trains the demo's model
(``configs/demo.py``: a half-width ResNet-18 on 128x64 images, random initialisation) four
ways, each with every seed:

* ``plain``: Cluster Contrast (Jaccard distance + DBSCAN);
* ``ca_jaccard``: the CA-Jaccard distance (``cluster.distance="ca_jaccard"``);
* ``proxy``: the camera-aware proxy loss (``camera.enabled=True``);
* ``both``: the two together;
* ``hard`` and ``bmw``: the memory's other update rules (``memory.update_rule``: the hardest
  sample's momentum update, BMW's bidirectional rewrite; ``plain`` is the momentum rule).

``--data demo`` trains on the demo's dataset instead (``python -m ccreid_jax.data.synthetic``
defaults, no camera shift) with the demo's whole recipe (15 epochs of 40 steps, evaluated
every 5) unless ``--epochs`` / ``--iters`` are given.

For each run it reports, per epoch, the adjusted Rand index of the pseudo labels against the
true identities (``cluster_ari``) and against the cameras (``camera_ari``), the share of
clusters whose members all come from one camera (``one_camera_clusters``), and the final
mAP / rank-1 on the generated query / gallery. Camera-aware training should give a higher
identity ARI, a lower camera ARI and a higher mAP than ``plain``. Per epoch it also keeps the
mean loss over the first and the last tenth of the steps (``loss_start``, ``loss_end``): a rule
that keeps the memory hard makes the loss rise within an epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccreid_jax import run as run_lib
from ccreid_jax import xla_cpu

VARIANTS = {
  "plain": {},
  "ca_jaccard": {"cluster.distance": "ca_jaccard"},
  "proxy": {"camera.enabled": True},
  "both": {"cluster.distance": "ca_jaccard", "camera.enabled": True},
  "hard": {"memory.update_rule": "hard"},
  "bmw": {"memory.update_rule": "bmw"},
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="config.seed values")
  p.add_argument(
    "--variants",
    nargs="+",
    default=["plain", "ca_jaccard", "proxy", "both"],
    choices=list(VARIANTS),
  )
  p.add_argument(
    "--data",
    choices=("camera", "demo"),
    default="camera",
    help="camera: the camera-shifted set; demo: the demo's dataset and recipe",
  )
  p.add_argument("--epochs", type=int, default=None, help="default 8 (camera), 15 (demo)")
  p.add_argument(
    "--iters", type=int, default=None, help="train steps per epoch; default 30 (camera), 40 (demo)"
  )
  p.add_argument("--camera-shift", type=float, default=1.0)
  p.add_argument("--num-train-identities", type=int, default=60)
  p.add_argument("--num-test-identities", type=int, default=40)
  p.add_argument("--num-cameras", type=int, default=6)
  p.add_argument("--images-per-camera", type=int, nargs=2, default=(2, 4), metavar=("LO", "HI"))
  p.add_argument("--root", default="runs/bench_camera", help="dataset and run folders")
  p.add_argument("--out", default="", help="write the results as JSON here")
  return p.parse_args(argv)


def run_config(args, variant: str, seed: int, data_root: str):
  """configs/demo.py on the generated data, with the variant's fields and the seed."""
  from ccreid_jax.configs import demo

  config = demo.get_config()
  config.data.root = data_root
  config.seed = seed
  if args.data == "camera" or args.epochs is not None:
    epochs = 8 if args.epochs is None else args.epochs
    config.train.epochs = epochs
    config.train.eval_every = epochs
    config.train.eval_initial = False
    config.optim.step_size = max(1, int(epochs * 0.8))
  if args.data == "camera" or args.iters is not None:
    config.train.iters = 30 if args.iters is None else args.iters
  config.log.progress = False
  config.log.ranklist_queries = 0
  config.log.tensorboard = False
  for field, value in VARIANTS[variant].items():
    group, name = field.split(".")
    config[group][name] = value
  return config


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, force=True)
  from ccreid_jax import train
  from ccreid_jax.data import synthetic

  if args.data == "demo":  # the demo's dataset: the generator's defaults.
    data_root = os.path.join(args.root, "data_demo")
    synthetic.generate_market_dataset(data_root)
  else:
    data_root = os.path.join(args.root, f"data_shift{args.camera_shift:g}")
    synthetic.generate_market_dataset(
      data_root,
      num_train_identities=args.num_train_identities,
      num_test_identities=args.num_test_identities,
      num_cameras=args.num_cameras,
      images_per_camera=tuple(args.images_per_camera),
      height=128,
      width=64,
      seed=0,
      camera_shift=args.camera_shift,
    )
  results = {"args": vars(args), "runs": []}
  for variant in args.variants:
    for seed in args.seeds:
      workdir = os.path.join(args.root, f"{args.data}_{variant}_seed{seed}")
      config = run_config(args, variant, seed, data_root)
      config.data.cache_dir = os.path.join(args.root, f"cache_{args.data}")
      start = time.time()
      final = train.train_and_evaluate(config, workdir)
      records = run_lib.Run(workdir).epoch_records()
      run = {
        "variant": variant,
        "seed": seed,
        "seconds": time.time() - start,
        "mAP": final["last"]["mAP"],
        "rank1": final["last"]["rank1"],
        "epochs": [
          {
            k: r.get(k)
            for k in (
              "epoch",
              "clusters",
              "outliers",
              "cluster_ari",
              "camera_ari",
              "one_camera_clusters",
              "loss",
              "loss_start",
              "loss_end",
              "mAP",
            )
          }
          for r in records
        ],
      }
      results["runs"].append(run)
      last = run["epochs"][-1]
      print(
        f"{variant:>10} seed {seed}: mAP {100 * run['mAP']:5.1f} rank1 "
        f"{100 * run['rank1']:5.1f} | last epoch: cluster ARI {last['cluster_ari']:.3f} "
        f"camera ARI {last['camera_ari']:.3f} one-camera clusters "
        f"{last['one_camera_clusters']:.2f} ({run['seconds']:.0f} s)",
        flush=True,
      )
  print_summary(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else float("nan")


def print_summary(results: dict) -> None:
  """Per variant, means over seeds: final mAP / rank-1, and the ARIs and one-camera share
  averaged over the epochs (the whole training's clusterings) and at the last epoch."""
  print(
    f"\n{'variant':>10} | {'mAP':>5} | {'rank1':>5} | {'cluster ARI':>11} | "
    f"{'camera ARI':>10} | {'1-camera':>8} | {'cluster ARI':>11} | {'camera ARI':>10} | "
    f"{'1-camera':>8} | {'loss rise':>9}"
  )
  print(
    f"{'':>10} | {'final':>13} | {'mean over epochs':>35} | {'last epoch':>35} | {'in epoch':>9}"
  )
  for variant in results["args"]["variants"]:
    runs = [r for r in results["runs"] if r["variant"] == variant]
    if not runs:
      continue
    over = {
      k: _mean([_mean([e[k] for e in r["epochs"]]) for r in runs])
      for k in ("cluster_ari", "camera_ari", "one_camera_clusters")
    }
    last = {
      k: _mean([r["epochs"][-1][k] for r in runs])
      for k in ("cluster_ari", "camera_ari", "one_camera_clusters")
    }
    print(
      f"{variant:>10} | {100 * _mean([r['mAP'] for r in runs]):5.1f} | "
      f"{100 * _mean([r['rank1'] for r in runs]):5.1f} | {over['cluster_ari']:11.3f} | "
      f"{over['camera_ari']:10.3f} | {over['one_camera_clusters']:8.2f} | "
      f"{last['cluster_ari']:11.3f} | {last['camera_ari']:10.3f} | "
      f"{last['one_camera_clusters']:8.2f} | {_loss_rise(runs):9.3f}"
    )


def _loss_rise(runs: list[dict]) -> float:
  """The mean over runs and epochs of the loss over an epoch's last tenth of steps minus the
  loss over its first tenth (positive: the loss rises within an epoch)."""
  return _mean(
    [
      _mean([e["loss_end"] - e["loss_start"] for e in r["epochs"] if e.get("loss_end") is not None])
      for r in runs
    ]
  )


if __name__ == "__main__":
  xla_cpu.apply_cpu_tuning()
  main()
