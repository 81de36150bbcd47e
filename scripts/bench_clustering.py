"""Benchmark of the pseudo-labelling step: kNN, (CA-)Jaccard distance, DBSCAN, InfoMap.

Generates synthetic clustered unit features, times each stage and prints a table; ``--out``
also writes the numbers as JSON. Timings are wall-clock seconds on the default JAX device
(the kNN) and the host (everything else); peak RSS is ``ru_maxrss`` of this process.

  python scripts/bench_clustering.py --n 12936 --dim 2048 --method both --out clustering.json

The features: ``C`` cluster centres (in groups of 8 that share a common direction, like people
in similar clothes), lognormal cluster sizes, per-cluster spread, and 10% of the points drawn
around the group directions only (outliers). Points live in a random ``--intrinsic``-dimensional
subspace of the ``--dim``-dimensional space: with the default 32, neighbourhoods overlap the way
real re-ID features do (about 2,600 stored Jaccard pairs per row at N = 12,936, k1 = 30, k2 = 6);
full-rank Gaussian clusters would give a few dozen and an unrealistically easy benchmark.

``--distance ca_jaccard`` times the camera-aware Jaccard distance (docs/algorithms.md section 9)
instead of the plain one, on the same features: every point gets a camera drawn uniformly from
``--cameras`` cameras with a separate random stream, so the features do not depend on it. With
``--camera-shift s`` (default 0) each camera also adds ``s`` times its own random direction to
the low-dimensional points before the normalisation, as a camera bias does in real features.
``knn_s`` is then the camera-aware kNN (intra- and inter-camera list heads) and
``jaccard_post_knn_s`` the rest of the distance.

  python scripts/bench_clustering.py --n 12936 --distance ca_jaccard --cameras 6

``--dense-compare`` also runs a straightforward dense implementation written here (N x N
float32 distance, full stable argsort, dense V, and the min-sum through an inverted index with a
Python loop per row, as the reference does), reports its time and whether its DBSCAN labels
agree. It needs about 4 N^2 bytes several times over: it is skipped above ``--dense-max-n``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccreid_jax.clustering import ca_jaccard, dbscan_labels, infomap_labels, jaccard
from ccreid_jax.utils import write_json


def synthetic_features(
  n: int,
  dim: int,
  clusters: int,
  *,
  intrinsic: int = 32,
  outlier_fraction: float = 0.1,
  seed: int = 0,
  camera_shift: float = 0.0,
  cameras: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(n, dim) float32 unit features and their generating cluster (-1 for the outliers).

  ``cameras`` (n,) ints (after the permutation, i.e. per output row) and ``camera_shift > 0``
  add ``camera_shift`` times a random unit direction per camera; without them the features are
  those of the camera-free benchmark.
  """
  rng = np.random.default_rng(seed)
  r = min(intrinsic, dim)
  groups = max(1, clusters // 8)
  group_dir = rng.standard_normal((groups, r))
  group_dir /= np.linalg.norm(group_dir, axis=1, keepdims=True)
  group_of = rng.integers(0, groups, clusters)
  centres = 0.6 * group_dir[group_of] + 0.8 * rng.standard_normal((clusters, r)) / np.sqrt(r)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  num_in = n - int(round(outlier_fraction * n))
  weights = rng.lognormal(0.0, 0.6, clusters)
  truth = rng.choice(clusters, num_in, p=weights / weights.sum())
  spread = rng.uniform(0.6, 1.0, clusters)
  low = np.empty((n, r), dtype=np.float32)
  noise = rng.standard_normal((num_in, r)) / np.sqrt(r)
  low[:num_in] = centres[truth] + spread[truth, None] * noise
  out_group = rng.integers(0, groups, n - num_in)
  low[num_in:] = 0.5 * group_dir[out_group] + rng.standard_normal((n - num_in, r)) / np.sqrt(r)
  truth = np.concatenate([truth, np.full(n - num_in, -1)])
  basis, _ = np.linalg.qr(rng.standard_normal((dim, r)))  # orthonormal columns
  perm = rng.permutation(n)
  low = low[perm]
  if camera_shift and cameras is not None:
    camera_rng = np.random.default_rng([seed, 2])
    camera_dirs = camera_rng.standard_normal((int(cameras.max()) + 1, r))
    camera_dirs /= np.linalg.norm(camera_dirs, axis=1, keepdims=True)
    low += np.float32(camera_shift) * camera_dirs[cameras].astype(np.float32)
  x = low @ basis.T.astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return np.ascontiguousarray(x, dtype=np.float32), truth[perm]


def synthetic_cameras(n: int, num_cameras: int, seed: int = 0) -> np.ndarray:
  """(n,) cameras drawn uniformly from ``num_cameras`` (their own random stream)."""
  return np.random.default_rng([seed, 1]).integers(0, num_cameras, n)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start


def matmul_only(x: np.ndarray, block: int = 1024) -> None:
  """The exact kNN matrix product alone (numpy float32, blockwise, results discarded)."""
  for s in range(0, x.shape[0], block):
    x[s : s + block] @ x.T


def dense_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
  """Straightforward dense Jaccard distance (N x N float32), section 5 step by step."""
  n = x.shape[0]
  dist = 2.0 - 2.0 * (x @ x.T)
  rank = np.argsort(dist, axis=1, kind="stable")[:, :k1]
  k_half = int(np.round(k1 / 2))

  def reciprocal(i, k):
    fwd = rank[i, : k + 1]
    return fwd[np.any(rank[fwd, : k + 1] == i, axis=1)]

  v = np.zeros((n, n), dtype=np.float32)
  for i in range(n):
    r_i = reciprocal(i, k1)
    expanded = [r_i]
    for c in r_i:
      r_c = reciprocal(c, k_half)
      if np.intersect1d(r_c, r_i).size > 2 / 3 * r_c.size:
        expanded.append(r_c)
    cols = np.unique(np.concatenate(expanded))
    w = np.exp(-dist[i, cols].astype(np.float64) + dist[i, cols].min())
    v[i, cols] = w / w.sum()
  if k2 > 1:
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
  inv_index = [np.flatnonzero(v[:, k]) for k in range(n)]
  out = np.empty((n, n), dtype=np.float32)
  for i in range(n):
    m = np.zeros(n, dtype=np.float64)
    for k in np.flatnonzero(v[i]):
      partners = inv_index[k]
      m[partners] += np.minimum(v[i, k], v[partners, k])
    out[i] = np.maximum(1.0 - m / (2.0 - m), 0.0)
  return out


def machine() -> dict:
  info = {"nproc": os.cpu_count(), "python": platform.python_version()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(
        line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
      )
  except (OSError, StopIteration):
    info["cpu"] = platform.processor()
  info["loadavg_start"] = list(os.getloadavg())
  import jax

  info["jax_device"] = str(jax.devices()[0])
  return info


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=12936)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--clusters", type=int, default=None, help="default: n // 17")
  parser.add_argument("--intrinsic", type=int, default=32)
  parser.add_argument("--method", choices=["dbscan", "infomap", "both"], default="dbscan")
  parser.add_argument(
    "--distance",
    choices=["jaccard", "ca_jaccard"],
    default="jaccard",
    help="distance DBSCAN clusters with (ca_jaccard: camera-aware)",
  )
  parser.add_argument(
    "--cameras", type=int, default=6, help="number of cameras (ca_jaccard, shift)"
  )
  parser.add_argument("--camera-shift", type=float, default=0.0)
  parser.add_argument("--k1-intra", type=int, default=5)
  parser.add_argument("--k1-inter", type=int, default=20)
  parser.add_argument("--k2-intra", type=int, default=2)
  parser.add_argument("--k2-inter", type=int, default=4)
  parser.add_argument("--k1", type=int, default=30)
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--eps", type=float, default=0.6)
  parser.add_argument("--min-samples", type=int, default=4)
  parser.add_argument(
    "--full",
    action="store_true",
    help="also time the full output (max_distance=None) and its DBSCAN",
  )
  parser.add_argument(
    "--skip-matmul", action="store_true", help="do not time the bare matmul reference"
  )
  parser.add_argument("--dense-compare", action="store_true")
  parser.add_argument("--dense-max-n", type=int, default=16000)
  parser.add_argument("--block-size", type=int, default=1024)
  parser.add_argument("--warmup-max-n", type=int, default=20000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  clusters = args.clusters or max(1, args.n // 17)

  res = {
    "n": args.n,
    "dim": args.dim,
    "clusters": clusters,
    "intrinsic": args.intrinsic,
    "distance": args.distance,
    "eps": args.eps,
    "min_samples": args.min_samples,
    "machine": machine(),
  }
  ca = args.distance == "ca_jaccard"
  if ca:
    ks = {
      "k1_intra": args.k1_intra,
      "k1_inter": args.k1_inter,
      "k2_intra": args.k2_intra,
      "k2_inter": args.k2_inter,
    }
    res.update(ks, cameras=args.cameras, camera_shift=args.camera_shift)
  else:
    res.update(k1=args.k1, k2=args.k2)
  cameras = synthetic_cameras(args.n, args.cameras, args.seed)
  (x, _truth), res["generate_s"] = timed(
    synthetic_features,
    args.n,
    args.dim,
    clusters,
    intrinsic=args.intrinsic,
    seed=args.seed,
    camera_shift=args.camera_shift,
    cameras=cameras,
  )
  res["rss_after_features_gb"] = peak_rss_gb()

  def neighbour_lists():
    if not ca:
      return jaccard.knn(x, min(args.k1, args.n), args.block_size)
    codes = ca_jaccard.check_cameras(cameras, args.n)
    intra_len = min(max(args.k1_intra + 1, args.k2_intra), args.n)
    inter_len = min(max(args.k1_inter + 1, args.k2_inter), args.n)
    return ca_jaccard.camera_ranking_lists(x, codes, intra_len, inter_len, args.block_size)

  def distance(lists, max_distance):
    if not ca:
      return jaccard.jaccard_from_knn(x, *lists, args.k1, args.k2, max_distance)
    return ca_jaccard.ca_jaccard_from_lists(x, *lists, max_distance=max_distance, **ks)

  # Warm-up: compiles the jitted kNN block for this (N, D) before timing it. It runs a whole
  # kNN, so above --warmup-max-n it is skipped and knn_s includes the compilation (< 1 s).
  res["knn_warmup"] = args.n <= args.warmup_max_n
  if res["knn_warmup"]:
    neighbour_lists()
  if not args.skip_matmul:
    _, res["matmul_s"] = timed(matmul_only, x, args.block_size)
  if args.method in ("dbscan", "both"):
    lists, res["knn_s"] = timed(neighbour_lists)
    cut, res["jaccard_post_knn_s"] = timed(distance, lists, args.eps)
    res["stored_per_row"] = cut.nnz / args.n
    labels, res["dbscan_s"] = timed(dbscan_labels, cut, args.eps, args.min_samples)
    res["step_s"] = res["knn_s"] + res["jaccard_post_knn_s"] + res["dbscan_s"]
    res["dbscan_clusters"] = int(labels.max() + 1)
    res["dbscan_outliers"] = int(np.sum(labels < 0))
    if args.full:
      full, res["jaccard_post_knn_full_s"] = timed(distance, lists, None)
      res["stored_per_row_full"] = full.nnz / args.n
      full_labels, res["dbscan_full_s"] = timed(dbscan_labels, full, args.eps, args.min_samples)
      res["full_labels_agree"] = bool(np.array_equal(full_labels, labels))
      del full
    del cut, lists
    res["rss_after_dbscan_gb"] = peak_rss_gb()
    if args.dense_compare:
      if ca:
        res["dense"] = "skipped: the dense comparison is the plain Jaccard distance"
      elif args.n > args.dense_max_n:
        res["dense"] = f"skipped: n > --dense-max-n={args.dense_max_n}"
      else:
        dense, res["dense_jaccard_s"] = timed(dense_jaccard, x, args.k1, args.k2)
        dense_labels, res["dense_dbscan_s"] = timed(
          dbscan_labels, dense, args.eps, args.min_samples
        )
        res["dense_labels_agree"] = bool(np.array_equal(dense_labels, labels))
        del dense
  if args.method in ("infomap", "both"):
    im_labels, res["infomap_s"] = timed(infomap_labels, x, block_size=args.block_size)
    res["infomap_clusters"] = int(im_labels.max() + 1)
    res["infomap_outliers"] = int(np.sum(im_labels < 0))
  res["peak_rss_gb"] = peak_rss_gb()
  res["machine"]["loadavg_end"] = list(os.getloadavg())

  print(
    f"N={args.n} D={args.dim} clusters={clusters} intrinsic={args.intrinsic} "
    f"({res['machine']['nproc']} CPUs, {res['machine']['jax_device']}, load "
    f"{res['machine']['loadavg_start'][0]:.2f} -> {res['machine']['loadavg_end'][0]:.2f})"
  )
  for key, value in res.items():
    if key == "machine":
      continue
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"  {key:<26} {text}")
  if args.out:
    write_json(args.out, res)
  return res


if __name__ == "__main__":
  # The CPU settings of ccreid_jax/xla_cpu.py, before JAX's backend starts (main() starts
  # it); CCREID_XLA_CPU_DEFAULTS=0 in the environment turns them off.
  from ccreid_jax import xla_cpu

  xla_cpu.apply_cpu_tuning()
  main()
