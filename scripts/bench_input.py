"""Throughput of the training input pipeline alone (no model): images/s.

  python scripts/bench_input.py --height 256 --width 128 --batch 64 --num-images 12936 \
      [--batches 100] [--out input.json]

What ``train_and_evaluate`` does per batch, on synthetic data: the camera-aware PxK sampler
over random pseudo labels draws the indices, the uint8 images are gathered from a
memory-mapped cache file (random rows, as in training), and ``jax.device_put`` sends images
and labels to the devices sharded along the batch axis. Each stage is timed separately
(medians over the batches, ``block_until_ready`` on the transfers), then the whole chain
through ``train.prefetch_batches`` (the host thread that overlaps the gather with the
step) with nothing consuming the batches but a wait for them.

The memmap is written to ``--dir`` (default: a temporary directory); right after writing,
its pages are likely in the OS page cache, so the gather measures memory, not disk,
bandwidth unless the file is larger than free RAM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ccreid_jax import train
from ccreid_jax.data.sampler import CameraAwarePKSampler
from ccreid_jax.distributed import make_mesh
from ccreid_jax.utils import write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--num-instances", type=int, default=16)
  p.add_argument("--num-images", type=int, default=12936, help="images in the memmap")
  p.add_argument("--clusters", type=int, default=600)
  p.add_argument("--cameras", type=int, default=6, help="number of cameras")
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--dir", default="", help="where to write the memmap (default: a temp dir)")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  load_start = [round(x, 2) for x in os.getloadavg()]
  rng = np.random.default_rng(0)
  mesh = make_mesh()
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  labels = rng.integers(-1, args.clusters, size=args.num_images)  # ~0.2% outliers
  cameras = rng.integers(0, args.cameras, size=args.num_images)

  with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
    path = os.path.join(tmp, "images.npy")
    shape = (args.num_images, args.height, args.width, 3)
    t = time.perf_counter()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    for start in range(0, args.num_images, 512):
      stop = min(args.num_images, start + 512)
      out[start:stop] = rng.integers(0, 256, size=(stop - start,) + shape[1:], dtype=np.uint8)
    out.flush()
    del out
    write_s = time.perf_counter() - t
    images = np.load(path, mmap_mode="r")

    def sampler(seed=0):
      return CameraAwarePKSampler(labels, cameras, args.num_instances, seed=seed)

    t = time.perf_counter()
    index_batches = list(sampler().batches(args.batches, args.batch))
    sample_s = (time.perf_counter() - t) / args.batches

    gather_s, put_s = [], []
    for idx in index_batches:
      t = time.perf_counter()
      host = np.asarray(images[idx])
      host_labels = labels[idx].astype(np.int32)
      t1 = time.perf_counter()
      jax.block_until_ready((jax.device_put(host, sharding), jax.device_put(host_labels, sharding)))
      t2 = time.perf_counter()
      gather_s.append(t1 - t)
      put_s.append(t2 - t1)

    # The whole chain as training runs it: sampler -> prefetch thread -> devices.
    t = time.perf_counter()
    count = 0
    for batch in train.prefetch_batches(
      sampler(1).batches(args.batches, args.batch), images, labels, sharding
    ):
      jax.block_until_ready(batch)
      count += 1
    chain_s = (time.perf_counter() - t) / count
    del images

  def per_s(s):
    return args.batch / s if s > 0 else float("nan")

  result = {
    "args": vars(args),
    "jax_version": jax.__version__,
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "memmap_bytes": int(np.prod(shape)),
    "memmap_write_s": write_s,
    "sampler_s_per_batch": sample_s,
    "gather_s_per_batch": float(np.median(gather_s)),
    "device_put_s_per_batch": float(np.median(put_s)),
    "chain_s_per_batch": chain_s,
    "sampler_images_per_s": per_s(sample_s),
    "gather_images_per_s": per_s(float(np.median(gather_s))),
    "device_put_images_per_s": per_s(float(np.median(put_s))),
    "chain_images_per_s": per_s(chain_s),
    "loadavg_start": load_start,
    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
  }
  mb = args.batch * args.height * args.width * 3 / 2**20
  print(
    f"\ninput pipeline {args.height}x{args.width} uint8, batch {args.batch} ({mb:.1f} MiB), "
    f"{args.num_images} images on {result['device_kind']} x{result['device_count']}; "
    f"load {result['loadavg_start']} -> {result['loadavg_end']}"
  )
  print(f"{'stage':26s} | {'ms/batch':>9s} | {'images/s':>10s}")
  print("-" * 51)
  for name, key in (
    ("PK sampler", "sampler"),
    ("gather from memmap", "gather"),
    ("device_put + wait", "device_put"),
    ("whole chain (prefetch)", "chain"),
  ):
    print(
      f"{name:26s} | {1000 * result[key + '_s_per_batch']:9.2f} | "
      f"{result[key + '_images_per_s']:10.0f}"
    )
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  # The CPU settings of ccreid_jax/xla_cpu.py, before JAX's backend starts (main() starts
  # it); CCREID_XLA_CPU_DEFAULTS=0 in the environment turns them off.
  from ccreid_jax import xla_cpu

  xla_cpu.apply_cpu_tuning()
  main()
