"""Throughput of the jitted train step and of feature extraction (images/s).

  python scripts/bench_train.py --depth 50 --height 256 --width 128 --batch 64 \
      --dtype float32 --steps 10 [--kernels both] [--torch] [--rounds 3] [--out train.json]

Synthetic data: ``--num-images`` random uint8 images in a memory-mapped file (the layout of
the image cache), random pseudo labels and a ``--clusters``-row memory. Every timing is
wall-clock ``time.perf_counter`` around work forced to finish with ``block_until_ready``:

* ``input``: gather a batch of random indices from the memmap + ``device_put`` + wait;
* ``compute``: the train step alone, on a batch already on the devices;
* ``pipelined``: the loop ``train_and_evaluate`` runs (``train.prefetch_batches`` gathers
  and transfers the next batches on a host thread while the step runs);
* ``extract``: ``extract_features`` over ``--extract-images`` images.

``--torch`` adds an equivalent PyTorch (CPU) train step at the same batch and image size:
a ResNet with last stride 1, GeM pooling, a BN neck with a frozen bias, L2-normalised
features against a memory matmul at temperature 0.05, cross-entropy, Adam with coupled L2.
Its input transform is normalisation + a random flip (no pad/crop or erasing), which is a
small part of a step. Compilation is excluded (``--warmup`` untimed steps). The PyTorch step
runs in the same process, so it shares the malloc setting (below); run with
``CCREID_XLA_CPU_DEFAULTS=0`` for a plain PyTorch process.

``--kernels`` picks the model's layer set (``model.kernels``): ``auto`` (the config's
default: the CPU kernels of ``ccreid_jax/models/cpu_kernels.py`` on the CPU, flax's plain
layers elsewhere), ``plain``, ``cpu``, or ``both``, which builds and times the two sets side
by side in one process (``jax_plain`` and ``jax_cpu`` in the output). Compare the two with
``--rounds``: the single blocks of steps are measured one after the other, and the set
measured second (``cpu``) has come out slower there than in the rounds or in a process of its
own (``--kernels cpu``).

``--rounds R`` then alternates the compute steps on one resident batch each: R rounds of
``--steps`` steps of every timed step (JAX and PyTorch with ``--torch``, or the two kernel
sets with ``--kernels both``; the order reversed every round), and reports each round's
median s/step and the ratio per round. On a shared or throttled CPU the step time drifts by
10-20% over a minute, which back-to-back blocks of steps confound with the difference between
the steps; paired rounds do not.

Each JAX entry also reports the minor page faults per compute step (``ru_minflt``; about zero
with the malloc setting of ``ccreid_jax/xla_cpu.py``, hundreds of thousands without it for
ResNet-50). ``--xla-figures`` adds XLA's own figures, which depend on the XLA version: the
bytes the compiled train step accesses (``cost_analysis``) and the most operands of one of its
fusions, plus two small programs the CPU kernels were written for: the value and gradient of a
training batch norm (closed-form gradient vs autodiff: bytes accessed) and the gradient of a
chain of 12 residual blocks (``residual_relu`` vs ``nn.relu``: the most operands of a
full-size fusion, which grows with the depth when later blocks recompute earlier outputs, and
bytes accessed).

As a program, the script first applies the CPU settings of ``ccreid_jax/xla_cpu.py`` (an XLA
flag and glibc's malloc options; ``cpu_defaults`` in the output says which took effect);
``CCREID_XLA_CPU_DEFAULTS=0`` in the environment turns them off.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ccreid_jax import memory as memory_lib
from ccreid_jax import models, train, xla_cpu
from ccreid_jax import state as state_lib
from ccreid_jax.distributed import make_mesh
from ccreid_jax.extract import extract_features, make_extract_fn
from ccreid_jax.utils import write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--model-width", type=int, default=64, help="ResNet base width (64 = standard)")
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation) first")
  p.add_argument("--clusters", type=int, default=500, help="memory rows in use")
  p.add_argument(
    "--num-images", type=int, default=0, help="images in the synthetic memmap (default: 8 batches)"
  )
  p.add_argument(
    "--extract-images",
    type=int,
    default=0,
    help="images to extract features of (default: 4 batches)",
  )
  p.add_argument(
    "--kernels",
    default="auto",
    choices=["auto", "plain", "cpu", "both"],
    help="model.kernels; both: time the plain and the CPU layer sets side by side",
  )
  p.add_argument("--torch", action="store_true", help="also time a PyTorch CPU train step")
  p.add_argument(
    "--rounds",
    type=int,
    default=0,
    help="with --torch or --kernels both: alternate the compute steps for this many rounds",
  )
  p.add_argument(
    "--xla-figures",
    action="store_true",
    help="also report XLA's bytes accessed and fusion sizes (XLA-version dependent)",
  )
  p.add_argument("--skip-extract", action="store_true")
  p.add_argument("--out", default="", help="write the results as JSON here")
  return p.parse_args(argv)


def _loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def synthetic_memmap(n: int, height: int, width: int, directory: str, seed: int = 0) -> np.ndarray:
  """An (n, H, W, 3) uint8 memmap of random images, written in chunks."""
  path = os.path.join(directory, "images.u8")
  images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
  rng = np.random.default_rng(seed)
  for start in range(0, n, 256):
    stop = min(n, start + 256)
    images[start:stop] = rng.integers(0, 256, size=(stop - start, height, width, 3), dtype=np.uint8)
  images.flush()
  return np.load(path, mmap_mode="r")


def make_config(args: argparse.Namespace, kernels: str = "auto"):
  from ccreid_jax.configs import default

  config = default.get_config()
  config.data.height, config.data.width = args.height, args.width
  config.model.depth = args.depth
  config.model.width = args.model_width
  config.model.dtype = args.dtype
  config.model.kernels = kernels
  config.train.batch_size = args.batch
  config.train.iters = 200
  return config


def _per_second(images: int, seconds: float) -> float:
  return images / seconds if seconds > 0 else float("nan")


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_jax(
  args: argparse.Namespace,
  images: np.ndarray,
  steppers: dict | None = None,
  *,
  kernels: str = "auto",
  name: str = "jax",
) -> dict:
  """Times the JAX step with ``model.kernels = kernels``; registers it as ``steppers[name]``."""
  config = make_config(args, kernels)
  mesh = make_mesh()
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = models.create_model(config.model)
  tx = state_lib.make_optimizer(config.optim, config.train.iters)
  dim = models.feature_dim(args.depth, args.model_width)
  rng = np.random.default_rng(0)
  centroids = rng.normal(size=(args.clusters, dim)).astype(np.float32)
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  memory = memory_lib.init_memory(centroids, memory_lib.bucket_size(args.clusters))
  state = jax.device_put(
    state_lib.create_train_state(model, config, tx=tx, memory=memory),
    NamedSharding(mesh, PartitionSpec()),
  )
  labels_all = rng.integers(0, args.clusters, size=images.shape[0]).astype(np.int32)
  step = train.make_train_step(config, mesh)

  def index_batches(count):
    for _ in range(count):
      yield np.sort(rng.choice(images.shape[0], size=args.batch, replace=False))

  def put(idx):
    batch = (
      jax.device_put(np.asarray(images[idx]), batch_sharding),
      jax.device_put(labels_all[idx], batch_sharding),
    )
    return jax.block_until_ready(batch)

  t0 = time.perf_counter()
  for idx in index_batches(args.warmup):
    state, metrics = step(state, *put(idx))
    jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  # Input alone, then compute alone on one resident batch, then the pipelined loop.
  input_s = []
  for idx in index_batches(args.steps):
    t = time.perf_counter()
    put(idx)
    input_s.append(time.perf_counter() - t)
  resident = put(next(index_batches(1)))
  compute_s, faults = [], []
  for _ in range(args.steps):
    f = _minor_faults()
    t = time.perf_counter()
    state, metrics = step(state, *resident)
    jax.block_until_ready((state, metrics))
    compute_s.append(time.perf_counter() - t)
    faults.append(_minor_faults() - f)
  t = time.perf_counter()
  for batch in train.prefetch_batches(
    index_batches(args.steps), images, labels_all, batch_sharding
  ):
    state, metrics = step(state, *batch)
  jax.block_until_ready((state, metrics))
  pipelined_s = time.perf_counter() - t
  loss = float(metrics["loss"])
  if steppers is not None:
    current = {"state": state}

    def one_step():
      current["state"], step_metrics = step(current["state"], *resident)
      jax.block_until_ready((current["state"], step_metrics))

    steppers[name] = one_step

  out = {
    "kernels": model.kernels,
    "compile_and_warmup_s": compile_s,
    "input_s_per_batch": float(np.median(input_s)),
    "compute_s_per_step": float(np.median(compute_s)),
    "pipelined_s_per_step": pipelined_s / args.steps,
    "final_loss": loss,
    "minor_faults_per_step": int(np.median(faults)),
  }
  if args.xla_figures:
    compiled = step.lower(state, *resident).compile()
    out["xla_bytes_accessed"] = _bytes_accessed(compiled)
    out["xla_largest_fusion_operands"] = largest_fusion_operands(compiled.as_text())
  out["input_images_per_s"] = _per_second(args.batch, out["input_s_per_batch"])
  out["compute_images_per_s"] = _per_second(args.batch, out["compute_s_per_step"])
  out["pipelined_images_per_s"] = _per_second(args.batch, out["pipelined_s_per_step"])

  if not args.skip_extract:
    extract_fn = make_extract_fn(model, mesh)
    n = args.extract_images or 4 * args.batch
    subset = images[:n]
    extract_features(
      extract_fn,
      state.variables,
      subset[: args.batch],
      mesh=mesh,
      batch_size=args.batch,
      progress=False,
    )  # compile
    t = time.perf_counter()
    features = extract_features(
      extract_fn, state.variables, subset, mesh=mesh, batch_size=args.batch, progress=False
    )
    seconds = time.perf_counter() - t
    assert features.shape == (n, dim)
    out.update(extract_images=n, extract_s=seconds, extract_images_per_s=_per_second(n, seconds))
  return out


# ---------------------------------------------------------------------------------------
# The PyTorch reference step (CPU).
# ---------------------------------------------------------------------------------------


def bench_torch(args: argparse.Namespace, images: np.ndarray, steppers: dict | None = None) -> dict:
  import torch
  import torch.nn.functional as F

  # The same PyTorch model the parity tests compare with (tests/torch_reid.py).
  sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
  )
  import torch_reid

  torch.manual_seed(0)
  model = torch_reid.TorchReIDResNet(args.depth, args.model_width).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
  memory = F.normalize(torch.randn(memory_lib.bucket_size(args.clusters), model.dim))
  rng = np.random.default_rng(0)
  labels_all = rng.integers(0, args.clusters, size=images.shape[0])
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

  def gather():
    idx = np.sort(rng.choice(images.shape[0], size=args.batch, replace=False))
    return torch.from_numpy(np.asarray(images[idx])), torch.from_numpy(labels_all[idx])

  def step(x_u8, y):
    x = (x_u8.permute(0, 3, 1, 2).float() - mean) / std
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    f = model(x)
    loss = F.cross_entropy(f @ memory.t() / 0.05, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():  # momentum update, one sample at a time as the reference.
      for feat, label in zip(f.detach(), y.tolist()):
        memory[label] = F.normalize(0.1 * memory[label] + 0.9 * feat, dim=0)
    return loss.item()

  for _ in range(args.warmup):
    step(*gather())
  input_s, compute_s = [], []
  for _ in range(args.steps):
    t = time.perf_counter()
    batch = gather()
    t1 = time.perf_counter()
    loss = step(*batch)
    t2 = time.perf_counter()
    input_s.append(t1 - t)
    compute_s.append(t2 - t1)
  total = float(np.sum(input_s) + np.sum(compute_s)) / args.steps
  if steppers is not None:
    resident = gather()
    steppers["torch"] = lambda: step(*resident)
  return {
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "input_s_per_batch": float(np.median(input_s)),
    "compute_s_per_step": float(np.median(compute_s)),
    "pipelined_s_per_step": total,  # serial: gather then step
    "input_images_per_s": _per_second(args.batch, float(np.median(input_s))),
    "compute_images_per_s": _per_second(args.batch, float(np.median(compute_s))),
    "pipelined_images_per_s": _per_second(args.batch, total),
    "final_loss": loss,
  }


def alternating_rounds(steppers: dict, rounds: int, steps: int) -> dict[str, list[float]]:
  """Median s/step of each stepper per round; the order is reversed every round."""
  names = list(steppers)
  per_round = {name: [] for name in names}
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      seconds = []
      for _ in range(steps):
        t = time.perf_counter()
        steppers[name]()
        seconds.append(time.perf_counter() - t)
      per_round[name].append(float(np.median(seconds)))
  return per_round


def _paired(
  steppers: dict, first: str, second: str, a: str, b: str, rounds: int, steps: int
) -> dict:
  """``steppers[first]`` (called ``a`` in the keys) against ``steppers[second]`` (``b``) in
  alternating rounds: each one's median s/step per round and the ratio a / b per round."""
  per_round = alternating_rounds({first: steppers[first], second: steppers[second]}, rounds, steps)
  ratios = [x / y for x, y in zip(per_round[first], per_round[second])]
  return {
    f"{a}_s_per_step": per_round[first],
    f"{b}_s_per_step": per_round[second],
    f"{a}_over_{b}": ratios,
    f"median_{a}_over_{b}": float(np.median(ratios)),
    f"{a}_median_s_per_step": float(np.median(per_round[first])),
    f"{b}_median_s_per_step": float(np.median(per_round[second])),
    f"rounds_{a}_faster": int(sum(r < 1.0 for r in ratios)),
  }


def kernel_rounds(steppers: dict, rounds: int, steps: int) -> dict:
  """The CPU kernels' step (``jax_cpu``) against the plain layers' (``jax_plain``)."""
  return _paired(steppers, "jax_cpu", "jax_plain", "cpu", "plain", rounds, steps)


def paired_rounds(steppers: dict, rounds: int, steps: int) -> dict:
  """Median s/step of each framework per round, alternating which goes first."""
  return _paired(steppers, "jax", "torch", "jax", "torch", rounds, steps)


# ---------------------------------------------------------------------------------------
# XLA's figures (--xla-figures): they depend on the XLA version.
# ---------------------------------------------------------------------------------------


def _bytes_accessed(compiled) -> float:
  """XLA's estimate of the bytes a compiled program reads and writes."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])


def largest_fusion_operands(hlo: str, shape: str = "") -> int:
  """Most operands of one fusion in compiled HLO text (of fusions whose result type starts
  with ``shape``, e.g. ``f32[64,32]``, when given)."""
  pattern = r"= " + re.escape(shape) + r"\S* fusion\((.*)" if shape else r" fusion\((.*)"
  counts = [
    len(re.findall(r"%[\w.\-]+", m.group(1).split("), kind")[0])) for m in re.finditer(pattern, hlo)
  ]
  return max(counts, default=0)


def kernel_figures() -> dict:
  """The two small programs the CPU kernels were written for (see the module doc)."""
  import flax.linen as nn
  import jax.numpy as jnp

  from ccreid_jax.models import cpu_kernels, layers

  shape = (2, 8, 16, 8, 64)
  xg = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), shape)
  scale, bias = jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])

  def bn_bytes(bn):
    f = jax.value_and_grad(lambda x, s, b, w: jnp.sum(bn(x, s, b, 1e-5)[0] * w), argnums=(0, 1, 2))
    return _bytes_accessed(jax.jit(f).lower(xg, scale, bias, w).compile())

  blocks = 12
  ws = [jax.random.normal(jax.random.PRNGKey(i), (32, 32)) / 6 for i in range(blocks)]
  s = jax.random.uniform(jax.random.PRNGKey(99), (blocks, 32)) + 0.5
  x = jax.random.normal(jax.random.PRNGKey(7), (64, 32))

  def chain(relu):
    def f(ws, s, x):
      y = x
      for k, wk in enumerate(ws):
        y = relu(jnp.dot(y, wk) * s[k] + y)
      return jnp.sum(y)

    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(ws, s, x).compile()
    return {
      "largest_full_size_fusion_operands": largest_fusion_operands(
        compiled.as_text(), "f32[64,32]"
      ),
      "bytes_accessed": _bytes_accessed(compiled),
    }

  return {
    "batch_norm_value_and_grad_bytes": {
      "closed_form": bn_bytes(cpu_kernels.batch_norm_train),
      "autodiff": bn_bytes(layers.batch_norm_groups),
    },
    "residual_chain_grad": {
      "residual_relu": chain(cpu_kernels.residual_relu),
      "nn.relu": chain(nn.relu),
    },
  }


def print_table(result: dict) -> None:
  a = result["args"]
  print(
    f"\nResNet-{a['depth']} {a['height']}x{a['width']} batch {a['batch']} {a['dtype']} on "
    f"{result['device_kind']} x{result['device_count']} (jax {result['jax_version']}); "
    f"load {result['loadavg_start']} -> {result['loadavg_end']}; "
    f"CPU defaults {result['cpu_defaults']}"
  )
  header = (
    f"{'':9s} | {'input img/s':>11s} | {'compute img/s':>13s} | "
    f"{'pipelined img/s':>15s} | {'s/step':>7s} | {'extract img/s':>13s}"
  )
  print(header)
  print("-" * len(header))
  for name in ("jax", "jax_plain", "jax_cpu", "torch"):
    r = result.get(name)
    if not r:
      continue
    extract = r.get("extract_images_per_s", float("nan"))
    print(
      f"{name:9s} | {r['input_images_per_s']:11.1f} | {r['compute_images_per_s']:13.2f} | "
      f"{r['pipelined_images_per_s']:15.2f} | {r['compute_s_per_step']:7.2f} | "
      f"{extract:13.2f}"
    )
  for name in ("jax", "jax_plain", "jax_cpu"):
    r = result.get(name)
    if r:
      xla = (
        f"; XLA: {r['xla_bytes_accessed'] / 1e9:.2f} GB accessed, largest fusion "
        f"{r['xla_largest_fusion_operands']} operands"
        if "xla_bytes_accessed" in r
        else ""
      )
      print(
        f"{name}: kernels {r['kernels']}, {r['minor_faults_per_step']} minor page faults "
        f"per step{xla}"
      )
  if "kernel_figures" in result:
    print(f"XLA figures of the CPU kernels' small programs: {result['kernel_figures']}")
  for key, a, b, a_name, b_name in (
    ("kernel_rounds", "cpu", "plain", "cpu", "plain"),
    ("paired", "jax", "torch", "JAX", "PyTorch"),
  ):
    paired = result.get(key)
    if paired:
      ratios = paired[f"{a}_over_{b}"]
      print(
        f"{key}: {a_name} {paired[f'{a}_median_s_per_step']:.3f} s/step, {b_name} "
        f"{paired[f'{b}_median_s_per_step']:.3f} s/step (medians over {len(ratios)} "
        f"rounds); {a_name} / {b_name} per round: median "
        f"{paired[f'median_{a}_over_{b}']:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}, "
        f"{a_name} faster in {paired[f'rounds_{a}_faster']} of {len(ratios)}"
      )


def main(argv=None) -> dict:
  args = parse_args(argv)
  num_devices = jax.device_count()
  if args.batch % num_devices:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the device count {num_devices}")
  both = args.kernels == "both"
  if args.rounds and not (args.torch or both):
    raise SystemExit(
      "--rounds alternates JAX and PyTorch steps, or the two kernel sets: it "
      "needs --torch or --kernels both"
    )
  result = {
    "args": vars(args),
    "jax_version": jax.__version__,
    "platform": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": num_devices,
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "loadavg_start": _loadavg(),
    # The CPU settings applied in this process (the PyTorch step shares the malloc one).
    "cpu_defaults": dict(xla_cpu.APPLIED),
  }
  with tempfile.TemporaryDirectory() as tmp:
    n = args.num_images or 8 * args.batch
    images = synthetic_memmap(max(n, args.extract_images, args.batch), args.height, args.width, tmp)
    steppers = {} if args.rounds > 0 else None
    if both:
      for kernels in ("plain", "cpu"):
        result[f"jax_{kernels}"] = bench_jax(
          args, images, steppers, kernels=kernels, name=f"jax_{kernels}"
        )
    else:
      result["jax"] = bench_jax(args, images, steppers, kernels=args.kernels)
    if args.torch:
      result["torch"] = bench_torch(args, images, steppers)
    if steppers is not None and both:
      result["kernel_rounds"] = kernel_rounds(steppers, args.rounds, args.steps)
    if steppers is not None and "jax" in steppers and args.torch:
      result["paired"] = paired_rounds(steppers, args.rounds, args.steps)
    del images
  if args.xla_figures:
    result["kernel_figures"] = kernel_figures()
  result["loadavg_end"] = _loadavg()
  print_table(result)
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  # Before JAX's backend starts (main() starts it); CCREID_XLA_CPU_DEFAULTS=0 turns it off.
  xla_cpu.apply_cpu_tuning()
  main()
