"""Wall time of a whole training recipe (clustering included), measured on a few epochs.

  python scripts/bench_recipe.py --config market1501 --epochs 3 \
      --num-train-identities 751 --num-test-identities 750 --images-per-camera 2 6 --workers 16 \
      [--dtype bfloat16] [--set train.iters=200 ...] [--out recipe.json]

No real dataset can be fetched, so the data is generated: ``ccreid_jax.data.synthetic``
writes a Market-1501-layout dataset of the given size (128x64 JPEGs, as Market's crops are;
751 train identities with ``--images-per-camera 2 6`` give about 13,000 train images, Market has
12,936), rendered by ``--workers`` processes. The config's recipe then runs unchanged
(``train_and_evaluate``: extraction, Jaccard + DBSCAN, ``train.iters`` steps per epoch,
checkpoints) except that it stops after ``--epochs`` epochs and evaluates only after the
last one. Timings:

* ``generate``: writing the dataset (skipped when ``--root`` already holds it);
* ``cache``: decoding every image into the uint8 cache (once per dataset and image size;
  later runs reuse it);
* ``startup``: from calling ``train_and_evaluate`` to the end of epoch 0 (model init,
  compilation of the extraction and the train step, the initial evaluation if the config
  asks for one, epoch 0's work);
* per epoch: ``extract``, ``cluster``, ``train``, ``eval`` (the run's own phase timers, in
  ``metrics.jsonl``) and ``wall``, the time between two epochs' records (so it also counts
  the checkpoint save and the plots); ``tail``: the last record to the return (the final
  checkpoint's commit).

Projection of the config's full recipe (``train.epochs`` epochs, an evaluation every
``train.eval_every`` epochs and after the last): ``startup + (epochs - 1) * steady +
evaluations * eval + tail``, where ``steady`` is the median of the measured epochs 1.. of
``wall - eval``. It assumes later epochs cost what the measured ones did: on real data the
number of clusters changes the clustering time a little, and the memory's rows are padded
to a power of two (the table's ``memory`` column), so only an epoch whose clusters need a
bucket not used before costs more: one compilation of the train step (about 20 s for
ResNet-50 on one H200), left out of the median. Run at least 3 epochs so ``steady`` is a
median.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from ccreid_jax import configs, train
from ccreid_jax.data import cache as cache_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data import synthetic
from ccreid_jax.utils import write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--config",
    default="market1501",
    help="a recipe name or the path of a config file, as ccreid_jax.main's",
  )
  p.add_argument("--epochs", type=int, default=3, help="epochs actually run (>= 2)")
  p.add_argument(
    "--dtype",
    default="",
    choices=["", "float32", "bfloat16"],
    help="model.dtype (default: the config's)",
  )
  p.add_argument(
    "--set",
    nargs="*",
    default=[],
    metavar="FIELD=VALUE",
    help="config overrides, e.g. train.iters=20 model.depth=18",
  )
  p.add_argument("--root", default="", help="dataset root (default: a folder in the workdir)")
  p.add_argument("--workdir", default="", help="run folder (default: a temporary folder)")
  p.add_argument("--num-train-identities", type=int, default=751)
  p.add_argument("--num-test-identities", type=int, default=750)
  p.add_argument("--images-per-camera", type=int, nargs=2, default=(2, 6), metavar=("LO", "HI"))
  p.add_argument("--seed", type=int, default=0, help="dataset seed")
  p.add_argument(
    "--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the dataset"
  )
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.epochs < 2:
    p.error("--epochs must be >= 2: epoch 0 compiles, the steady epochs come after it")
  return args


def load_config(path: str, overrides: list[str]):
  """``get_config()`` of the config ``path`` names (a file or a recipe name, as for
  ``ccreid_jax.main --config``) with ``FIELD=VALUE`` overrides applied."""
  spec = importlib.util.spec_from_file_location("_recipe_config", configs.resolve(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    field, sep, text = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string such as model.dtype=bfloat16
    node = config
    *parents, leaf = field.split(".")
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise SystemExit(f"--set {item!r}: the config has no field {field!r}")
    node[leaf] = value
  return config


def num_evaluations(epochs: int, eval_every: int) -> int:
  """Evaluations ``train_and_evaluate`` runs: every ``eval_every`` epochs and after the last."""
  return sum(1 for e in range(epochs) if (e + 1) % eval_every == 0 or e == epochs - 1)


def project(
  records: list[dict], *, start: float, end: float, full_epochs: int, eval_every: int
) -> dict:
  """Per-epoch times of a measured run and the projected wall time of the full recipe.

  ``records`` are the run's ``epoch`` records (metrics.jsonl) in order, ``start`` / ``end``
  the ``time.time()`` at the call of ``train_and_evaluate`` and at its return.
  """
  if len(records) < 2:
    raise ValueError(f"need at least 2 measured epochs, got {len(records)}")
  epochs = []
  previous = start
  for record in records:
    epochs.append(
      {
        "epoch": record["epoch"],
        "wall": record["time"] - previous,
        **{k: record.get(f"time_{k}", 0.0) for k in ("extract", "cluster", "train", "eval")},
      }
    )
    previous = record["time"]
  startup = epochs[0]["wall"]
  steady = statistics.median(e["wall"] - e["eval"] for e in epochs[1:])
  evaluated = [e["eval"] for e in epochs if e["eval"] > 0]
  eval_s = statistics.median(evaluated) if evaluated else 0.0
  tail = end - records[-1]["time"]
  evaluations = num_evaluations(full_epochs, eval_every)
  total = startup + (full_epochs - 1) * steady + evaluations * eval_s + tail
  return {
    "epochs": epochs,
    "startup": startup,
    "steady_epoch": steady,
    "eval": eval_s,
    "tail": tail,
    "full_epochs": full_epochs,
    "evaluations": evaluations,
    "projected_total": total,
    "measured_total": end - start,
  }


def print_table(result: dict) -> None:
  p = result["projection"]
  print(
    f"\n{result['config']} on {result['device_count']} x {result['device_kind']} "
    f"({result['platform']}, JAX {result['jax_version']}); dataset: "
    f"{result['num_train']} train / {result['num_query']} query / "
    f"{result['num_gallery']} gallery images; batch {result['batch_size']} x "
    f"{result['iters']} steps per epoch, {result['dtype']}"
  )
  print(
    f"generate {result['generate_s']:.1f} s, cache {result['cache_s']:.1f} s (both once per "
    f"dataset)"
  )
  print(
    f"{'epoch':>5} | {'wall s':>8} | {'extract':>8} | {'cluster':>8} | {'train':>8} | "
    f"{'eval':>7} | {'train img/s':>11} | clusters | memory"
  )
  for e, record in zip(p["epochs"], result["records"]):
    rate = result["batch_size"] * result["iters"] / e["train"] if e["train"] else 0.0
    print(
      f"{e['epoch']:>5} | {e['wall']:8.1f} | {e['extract']:8.1f} | {e['cluster']:8.1f} | "
      f"{e['train']:8.1f} | {e['eval']:7.1f} | {rate:11.0f} | {record.get('clusters', 0):8} | "
      f"{record.get('memory_bucket', '-')}"
    )
  minutes = p["projected_total"] / 60
  print(
    f"projected {p['full_epochs']} epochs ({p['evaluations']} evaluations): startup "
    f"{p['startup']:.1f} s + {p['full_epochs'] - 1} x {p['steady_epoch']:.1f} s + "
    f"{p['evaluations']} x {p['eval']:.1f} s + tail {p['tail']:.1f} s = "
    f"{p['projected_total']:.0f} s ({minutes:.1f} min), the dataset cache excluded"
  )


def main(argv=None) -> dict:
  args = parse_args(argv)
  # force: an import has already given the root logger a WARNING-level handler.
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = load_config(args.config, args.set)
  if args.dtype:
    config.model.dtype = args.dtype
  full_epochs, eval_every = int(config.train.epochs), int(config.train.eval_every)
  config_name = os.path.basename(configs.resolve(args.config))
  if config.data.name != "market1501":
    print(
      f"note: {config_name} trains on {config.data.name}; the generated dataset has the "
      "Market-1501 layout, so data.name is set to market1501"
    )
    config.data.name = "market1501"

  if args.workdir and os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
    raise SystemExit(
      f"--workdir {args.workdir} already holds a run, which would be resumed; "
      "the timing needs a new run folder (the dataset and its cache can be "
      "reused with --root and --set data.cache_dir=...)"
    )
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or os.path.join(tmp, "run")
    root = args.root or os.path.join(workdir, "data")
    t = time.perf_counter()
    synthetic.generate_market_dataset(
      root,
      num_train_identities=args.num_train_identities,
      num_test_identities=args.num_test_identities,
      images_per_camera=tuple(args.images_per_camera),
      seed=args.seed,
      workers=args.workers,
    )
    generate_s = time.perf_counter() - t

    config.data.root = root
    config.train.epochs = args.epochs
    config.train.eval_every = args.epochs
    config.log.progress = False
    if not config.model.pretrained:
      # Generated images and a timing, not an accuracy: the weights do not change the time.
      config.model.pretrained = "none"
    cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")
    t = time.perf_counter()
    dataset = datasets_lib.load_dataset(config.data.name, root)
    cache_lib.load_dataset_images(
      dataset,
      config.data.height,
      config.data.width,
      cache_dir,
      progress=False,
      num_workers=config.data.num_workers,
    )
    cache_s = time.perf_counter() - t

    start = time.time()
    final = train.train_and_evaluate(config, workdir)
    end = time.time()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f if line.strip()]
    records = [r for r in lines if r["kind"] == "epoch"]

  result = {
    "args": vars(args),
    "config": config_name,
    "jax_version": jax.__version__,
    "platform": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "dtype": config.model.dtype,
    "batch_size": int(config.train.batch_size),
    "iters": int(config.train.iters),
    "num_train": len(dataset.train),
    "num_query": len(dataset.query),
    "num_gallery": len(dataset.gallery),
    "generate_s": generate_s,
    "cache_s": cache_s,
    "records": records,
    "final": {k: float(v) for k, v in final.items()},
    "projection": project(
      records, start=start, end=end, full_epochs=full_epochs, eval_every=eval_every
    ),
  }
  print_table(result)
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  # The CPU settings of ccreid_jax/xla_cpu.py before JAX starts (CCREID_XLA_CPU_DEFAULTS=0: off).
  from ccreid_jax import xla_cpu

  xla_cpu.apply_cpu_tuning()
  main()
