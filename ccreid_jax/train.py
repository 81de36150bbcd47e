"""Cluster Contrast training and evaluation (docs/algorithms.md section 1).

``train_and_evaluate(config, workdir)`` runs (or resumes) a whole training run,
``evaluate(config, workdir)`` scores a saved checkpoint, ``extract`` writes a split's
features to ``.npz`` and ``load_variables`` gives the model of a checkpoint; ``main.py`` only
parses flags and calls one of them.

An epoch is four phases, each a function of its own:

* extraction: the train features in eval mode, on every device (``extract.make_extract_fn``);
* pseudo-labelling on the host (``pseudo_labels.pseudo_label``): the clustering, the memory's
  centroids, the RLCC targets and the epoch's cluster statistics;
* training on those labels (``train_on``): the memory, the camera-aware sampler, batches
  prefetched to the devices, ``train.iters`` jitted steps over a 1-axis device mesh (batch
  sharded, state replicated and donated);
* evaluation every ``eval_every`` epochs and after the last one.

A ``reporting.Reporter`` writes each epoch's record (metrics.jsonl, TensorBoard, pictures, the
log line) and a checkpoint is saved after every epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax import camera_memory
from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import distributed
from ccreid_jax import evaluation
from ccreid_jax import memory as memory_lib
from ccreid_jax import models
from ccreid_jax import validation
from ccreid_jax import workdir as workdir_lib
from ccreid_jax.data import augment as augment_lib
from ccreid_jax.data import loading
from ccreid_jax.data import sampler as sampler_lib
from ccreid_jax.export import check_output_path, export_features, split_images
from ccreid_jax.extract import make_extract_fn
from ccreid_jax.pseudo_labels import Generation, PseudoLabels, pseudo_label, rlcc_targets
from ccreid_jax.reporting import Reporter, save_rank_list
from ccreid_jax.utils import Timer, prefetch, progress_bar, write_json

__all__ = [
    "TrainState", "evaluate", "extract", "init_train_state", "load_variables",
    "make_lr_schedule", "make_optimizer", "make_train_step", "prefetch_batches",
    "rlcc_targets", "run_model_config", "train_and_evaluate", "train_on", "TrainingSetChanged",
]

logger = logging.getLogger("ccreid_jax")


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; donated to the step."""

  step: jax.Array  # int32 scalar: train steps done so far.
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: memory_lib.MemoryState
  rng: jax.Array  # uint32 (2,): base key of the augmentation stream.
  # The camera-aware proxies of the epoch (rebuilt every epoch, never checkpointed), or None.
  camera: camera_memory.CameraProxyState | None = None

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# ---------------------------------------------------------------------------------------
# The optimizer, the state and the train step.
# ---------------------------------------------------------------------------------------


def make_lr_schedule(optim: ml_collections.ConfigDict, iters_per_epoch: int) -> optax.Schedule:
  """Step decay by epochs: lr * gamma ** (epoch // step_size), no warm-up."""

  def schedule(count):
    epoch = count // iters_per_epoch
    return optim.lr * optim.gamma ** (epoch // optim.step_size).astype(jnp.float32)

  return schedule


def make_optimizer(optim: ml_collections.ConfigDict,
                   iters_per_epoch: int) -> optax.GradientTransformation:
  """Adam with coupled L2: weight decay is added to the gradient before Adam.

  This is ``torch.optim.Adam(weight_decay=...)`` (not AdamW), applied to every
  trainable tensor (the neck's BN bias is not a parameter at all).
  """
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(make_lr_schedule(optim, iters_per_epoch)),
  )


def has_pretrained(config: ml_collections.ConfigDict) -> bool:
  """Whether ``model.pretrained`` names a weights file (not "" or "none")."""
  return config.model.get("pretrained", "") not in ("", validation.NO_PRETRAINED)


def init_train_state(model: Any, tx: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, memory: memory_lib.MemoryState, *,
                     load_weights: bool = True) -> TrainState:
  """Random or pretrained init of the model, and the optimizer.

  ``load_weights=False`` skips ``model.pretrained`` (for the shapes of a checkpoint).
  """
  rng = jax.random.PRNGKey(config.seed)
  init_key, aug_key = jax.random.split(rng)
  dummy = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  # One compiled program instead of ~150 small eager ones; the values equal eager init's bit
  # for bit (models.conv_init).
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(init_key, dummy)
  if load_weights and has_pretrained(config):
    # The trunk from a torchvision / IBN-Net file (or a converted .npz); GeM and the neck
    # start fresh, as in the reference.
    variables = models.load_pretrained(
        config.model.pretrained, variables, depth=model.depth, ibn=model.ibn)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=jax.jit(tx.init)(params),
      memory=memory,
      rng=aug_key,
  )


class _WithPrecision:
  """A jitted function traced, compiled and run under ``jax.default_matmul_precision``."""

  def __init__(self, fn: Any, precision: str):
    self._fn = fn
    self._precision = precision

  def __call__(self, *args, **kwargs):
    with jax.default_matmul_precision(self._precision):
      return self._fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.default_matmul_precision(self._precision):
      return self._fn.lower(*args, **kwargs)


def with_precision(fn: Any, precision: str) -> Any:
  """``fn`` with ``model.precision`` applied to its matrix products and convolutions.

  "default" leaves JAX's default (which allows TF32 passes on Ampere / Hopper GPUs and
  bf16 passes on TPUs); "float32" asks for full float32 products, as the reference's
  PyTorch runs computed. The CPU computes float32 either way.
  """
  if precision == "default":
    return fn
  return _WithPrecision(fn, precision)


def make_train_step(model: Any, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: Mesh, *, soft_targets: bool = False,
                    camera: bool = False) -> Callable[..., tuple[TrainState, dict]]:
  """The jitted train step: augment, forward, memory loss, Adam, memory update.

  ``step(state, images, labels)`` uses the hard cross-entropy against the memory;
  with ``soft_targets=True`` it is ``step(state, images, labels, targets)`` with per-sample
  (B, C_pad) target distributions (RLCC) and the soft-target cross-entropy. With
  ``camera=True`` the batch's camera ids follow the labels (``step(state, images, labels,
  cams[, targets])``) and ``config.camera.weight`` times the inter-camera proxy loss against
  ``state.camera`` is added; the proxies then move with ``config.camera.momentum`` after the
  gradient, like the memory. Each variant is compiled separately, so with RLCC and the camera
  term off the step is exactly the plain Cluster Contrast one.
  """
  aug = config.augment
  mem = config.memory
  cam = config.camera

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *rest: jax.Array):
    cams = rest[0] if camera else None
    targets = rest[-1] if soft_targets else None
    key = jax.random.fold_in(state.rng, state.step)
    x = augment_lib.train_augment(
        key, images, flip_prob=aug.flip_prob, pad=aug.pad, erasing_prob=aug.erasing_prob)

    def loss_fn(params):
      features, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats"])
      if targets is None:
        loss = memory_lib.contrastive_loss(
            features, state.memory.centroids, labels, mem.temperature, valid=state.memory.valid)
      else:
        loss = memory_lib.soft_contrastive_loss(
            features, state.memory.centroids, targets, mem.temperature, valid=state.memory.valid)
      metrics = {"loss": loss}
      if camera:
        camera_loss = camera_memory.camera_proxy_loss(
            features, state.camera, labels, cams, temperature=cam.temperature,
            num_hard_negatives=cam.num_hard_negatives)
        loss = loss + cam.weight * camera_loss
        metrics = {"loss": loss, "camera_loss": camera_loss}
      return loss, (features, updates["batch_stats"], metrics)

    (_, (features, batch_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The memory is updated after, and outside, the gradient, with this step's features.
    features = jax.lax.stop_gradient(features)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        memory=memory_lib.update_centroids(state.memory, features, labels, mem))
    if camera:
      new_state = new_state.replace(camera=camera_memory.camera_proxy_update(
          state.camera, features, labels, cams, cam.momentum))
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
  batch_args = (batch_sharded,) * (2 + int(soft_targets) + int(camera))
  step = jax.jit(
      train_step,
      in_shardings=(replicated,) + batch_args,
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )
  return with_precision(step, config.model.precision)


class TrainSteps:
  """The compiled train steps of a run: hard and (with RLCC) soft targets.

  A step is compiled once per memory size (bucket) it meets; ``get`` logs when an epoch
  needs a size this process has not compiled yet (about 20 s for ResNet-50 on one H200).
  """

  def __init__(self, model: Any, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, mesh: Mesh):
    self.mesh = mesh
    self._make = functools.partial(make_train_step, model, tx, config, mesh)
    self._steps: dict[tuple[bool, bool], Any] = {}
    self._seen: set[tuple[bool, int, int]] = set()

  def get(self, *, soft: bool, bucket: int, camera_bucket: int, epoch: int,
          num_clusters: int):
    """The step for soft / hard targets, a memory of ``bucket`` rows and ``camera_bucket``
    proxy rows (0: no camera term)."""
    variant = (soft, bucket, camera_bucket)
    if self._seen and variant not in self._seen:
      logger.info("epoch %d: %d clusters, a %d-row memory%s%s: the train step compiles for "
                  "it (once per size)", epoch, num_clusters, bucket,
                  " with soft targets" if soft else "",
                  f" and {camera_bucket} camera proxy rows" if camera_bucket else "")
    self._seen.add(variant)
    kind = (soft, bool(camera_bucket))
    if kind not in self._steps:
      self._steps[kind] = self._make(soft_targets=soft, camera=bool(camera_bucket))
    return self._steps[kind]


def prefetch_batches(batches: Iterator[np.ndarray], images: np.ndarray, labels: np.ndarray,
                     sharding: NamedSharding, *, cams: np.ndarray | None = None,
                     targets: np.ndarray | None = None, num_columns: int = 0,
                     depth: int = 2) -> Iterator[tuple[jax.Array, ...]]:
  """Gathers the next batches on a host thread and sends them to the devices early.

  Yields ``(images, labels)``, followed by the camera ids when ``cams`` (N,) is given and by
  the target rows when ``targets`` (N, K) is given (zero-padded to ``num_columns``, the
  memory bucket): the arguments of the train step after the state.
  """

  mesh = sharding.mesh

  def load(indices):
    # Every process draws the same indices (seeded sampler) and feeds its own rows.
    rows = indices[distributed.process_slice(len(indices))]
    batch = (distributed.global_batch_from_local(np.asarray(images[rows]), mesh),
             distributed.global_batch_from_local(labels[rows].astype(np.int32), mesh))
    if cams is not None:
      batch += (distributed.global_batch_from_local(cams[rows].astype(np.int32), mesh),)
    if targets is None:
      return batch
    padded = np.zeros((len(rows), num_columns), np.float32)
    padded[:, :targets.shape[1]] = targets[rows]
    return batch + (distributed.global_batch_from_local(padded, mesh),)

  return prefetch(batches, load, depth)


def train_on(plan: PseudoLabels, state: TrainState, steps: TrainSteps, data: loading.RunData,
             config: ml_collections.ConfigDict, *, epoch: int,
             checkpoint_dir: str = "the run's checkpoints folder"
             ) -> tuple[TrainState, dict[str, list[float]]]:
  """One epoch's training on ``plan``'s labels: ``(state, the losses of every step)``.

  The losses are ``{"loss": [...]}`` (the total), plus ``"camera_loss"`` with the camera
  term.

  The memory is rebuilt from the plan's centroids (padded to its bucket), the camera-aware
  sampler draws ``train.iters`` batches seeded by ``(seed, epoch)``, and the steps run with
  the next batches prefetched. Losses are fetched every ``train.log_every`` steps; a
  non-finite one stops the run (``FloatingPointError``).
  """
  t = config.train
  bucket = memory_lib.bucket_size(plan.num_clusters, config.memory.min_bucket)
  memory = memory_lib.init_memory(plan.centroids, bucket)
  camera = None if plan.camera is None else distributed.replicate(plan.camera, steps.mesh)
  state = state.replace(memory=distributed.replicate(memory, steps.mesh), camera=camera)
  sampler = sampler_lib.CameraAwarePKSampler(
      plan.labels, data.train_cams, t.num_instances,
      seed=int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]))
  batches = prefetch_batches(
      sampler.batches(t.iters, t.batch_size), data.train_images, plan.labels,
      NamedSharding(steps.mesh, PartitionSpec("data")),
      cams=None if camera is None else data.train_cams, targets=plan.targets,
      num_columns=bucket)
  step_fn = steps.get(soft=plan.targets is not None, bucket=bucket,
                      camera_bucket=0 if camera is None else camera.bucket, epoch=epoch,
                      num_clusters=plan.num_clusters)
  losses: dict[str, list[float]] = {}
  pending: list[dict[str, jax.Array]] = []
  bar = progress_bar(total=t.iters, desc=f"epoch {epoch} train", unit="step",
                     enabled=bool(config.log.progress))
  for it, batch in enumerate(batches):
    state, metrics = step_fn(state, *batch)
    pending.append(metrics)
    if len(pending) == t.log_every or it == t.iters - 1:
      fetched = jax.device_get(pending)
      pending = []
      values = [float(m["loss"]) for m in fetched]
      if not np.all(np.isfinite(values)):
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch} step {it}: {values}; the checkpoints of the "
            f"earlier epochs are kept in {checkpoint_dir}")
      for m in fetched:
        for name, value in m.items():
          losses.setdefault(name, []).append(float(value))
      bar.set_postfix(loss=f"{values[-1]:.3f}")
    bar.update(1)
  bar.close()
  return state, losses


# ---------------------------------------------------------------------------------------
# Features and evaluation.
# ---------------------------------------------------------------------------------------


def make_feature_extractor(model: Any, config: ml_collections.ConfigDict, *, flip: bool = False):
  """``extract(variables, uint8 images, desc=...) -> (N, D)`` features on every process.

  Eval mode and the test transform; each process extracts its share on its own devices and
  the shares are all-gathered. ``flip``: the flip test (the mean of the features of each
  image and its mirror, normalised again), for evaluation only; clustering never flips.
  """
  mesh = distributed.local_mesh()
  extract_fn = with_precision(make_extract_fn(model, mesh, flip=flip), config.model.precision)
  return functools.partial(distributed.extract_and_allgather, extract_fn, mesh=mesh,
                           batch_size=config.eval.batch_size,
                           progress=bool(config.log.progress))


def evaluate_variables(extract, variables: Any, data: loading.RunData,
                       config: ml_collections.ConfigDict) -> tuple[dict[str, float], np.ndarray]:
  """``(mAP / CMC / mINP metrics, query x gallery distances)`` of ``data.eval_dataset``.

  ``extract`` is the evaluation's extractor (``make_feature_extractor(model, config,
  flip=config.eval.flip)``).
  """
  features = extract(variables, data.test_images, desc="eval extract")
  return evaluation.evaluate_features(features, data.eval_dataset, config.eval)


# ---------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------


def _abstract_checkpoint(model: Any, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, meta: dict[str, Any],
                         sharding: NamedSharding) -> Any:
  """The array tree a checkpoint with this ``meta`` holds, as shapes only."""
  feature_dim = models.feature_dim(model.depth, model.width)
  bucket = int(meta["memory_bucket"])
  memory = memory_lib.MemoryState(
      centroids=jnp.zeros((bucket, feature_dim), jnp.float32), valid=jnp.zeros((bucket,), bool))
  state = jax.eval_shape(
      lambda: init_train_state(model, tx, config, memory, load_weights=False))
  tree = {"train_state": _saved_fields(state),
          "pseudo_labels": jax.ShapeDtypeStruct((int(meta["num_train"]),), jnp.int32),
          "cluster_centroids": jax.ShapeDtypeStruct(
              (max(int(meta["num_clusters"]), 1), feature_dim), jnp.float32)}
  # Restored as global arrays replicated over the mesh (what every process needs).
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _saved_fields(state: TrainState) -> dict[str, Any]:
  """What a checkpoint keeps of the state: every field but the camera proxies, which every
  epoch rebuilds from its own clustering."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "camera"}


def _restore(checkpointer: checkpoint_lib.Checkpointer, step: int, model: Any,
             tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
             mesh: Mesh) -> checkpoint_lib.RestoredCheckpoint:
  """A checkpoint restored replicated over ``mesh``; ``state["train_state"]`` a TrainState."""
  meta = checkpointer.read_meta(step)
  restored = checkpointer.restore(
      step, _abstract_checkpoint(model, tx, config, meta, NamedSharding(mesh, PartitionSpec())))
  state = dict(restored.state, train_state=TrainState(**restored.state["train_state"]))
  return dataclasses.replace(restored, state=state)


def _save_checkpoint(checkpointer: checkpoint_lib.Checkpointer, epoch: int, state: TrainState,
                     plan: PseudoLabels, metrics: dict[str, float] | None,
                     config: ml_collections.ConfigDict, data: loading.RunData) -> None:
  generation = plan.generation
  meta = {"epoch": epoch, "memory_bucket": int(state.memory.centroids.shape[0]),
          "num_clusters": generation.num_clusters, "num_train": data.num_train,
          "train_fingerprint": loading.train_fingerprint(data.dataset.train),
          "seed": config.seed}
  if generation.indep_threshold is not None:
    meta["indep_threshold"] = generation.indep_threshold
  if metrics is not None:
    meta["metrics"] = {k: float(v) for k, v in metrics.items()}
  centroids = generation.centroids
  if not centroids.shape[0]:  # a stored array needs a row.
    centroids = np.zeros((1, centroids.shape[1]), np.float32)
  checkpointer.save(
      epoch + 1,
      {"train_state": _saved_fields(state), "pseudo_labels": generation.labels.astype(np.int32),
       "cluster_centroids": centroids.astype(np.float32)},
      meta)


def _generation_of(restored: checkpoint_lib.RestoredCheckpoint) -> Generation:
  """The clustering a checkpoint's epoch ended with (what the next epoch continues from)."""
  meta = restored.meta
  num_clusters = int(meta["num_clusters"])
  threshold = meta.get("indep_threshold")
  return Generation(
      labels=np.asarray(restored.state["pseudo_labels"]).astype(np.int64),
      centroids=np.asarray(restored.state["cluster_centroids"])[:num_clusters],
      indep_threshold=None if threshold is None else float(threshold))


# ---------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------


def _epoch_record(epoch: int, plan: PseudoLabels, losses: dict[str, list[float]],
                  state: TrainState, metrics: dict[str, float] | None, timer: Timer,
                  config: ml_collections.ConfigDict) -> dict[str, Any]:
  record: dict[str, Any] = {"epoch": epoch, **plan.stats}
  if plan.num_clusters:
    record["memory_bucket"] = memory_lib.bucket_size(plan.num_clusters, config.memory.min_bucket)
  if "camera_loss" in losses:
    record["camera_loss"] = float(np.mean(losses["camera_loss"]))
  record.update(loss=float(np.mean(losses["loss"])) if losses else float("nan"),
                steps=int(state.step),
                lr=float(make_lr_schedule(config.optim, config.train.iters)(
                    jnp.int32(epoch * config.train.iters))),
                **{f"time_{k}": v for k, v in timer.seconds.items()})
  if metrics is not None:
    record.update(metrics)
  return record


class TrainingSetChanged(ValueError):
  """A resumed run's training images are not the ones its checkpoints were trained on."""


def _check_training_set(meta: dict[str, Any], data: loading.RunData, workdir: str, *,
                        force: bool) -> None:
  """Refuses to resume on other training images (a changed count always; other images of the
  same count unless ``force``)."""
  saved_count, saved = int(meta["num_train"]), meta.get("train_fingerprint")
  current = loading.train_fingerprint(data.dataset.train)
  if saved_count == data.num_train and saved in (None, current):
    return
  what = (f"{workdir} was trained on {saved_count} images"
          + (f" (fingerprint {saved})" if saved else "") + f"; {data.dataset.root} now gives "
          f"{data.num_train} (fingerprint {current})")
  if saved_count != data.num_train or not force:
    raise TrainingSetChanged(
        f"The training set differs from the one this run was trained on: {what}. Resuming "
        "would continue on other images and mix evaluations of two datasets in one history. "
        "Point config.data.root at the original images, or train into a new --workdir"
        + ("." if saved_count != data.num_train else
           " (--force resumes anyway: the image count is the same)."))
  logger.warning("--force: resuming on a changed training set: %s", what)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       force: bool = False) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns its best and last evaluations.

  A killed run restarts from its latest checkpoint when called again with the same
  ``workdir``; per-epoch randomness is derived from ``(seed, epoch)`` and per-step
  randomness from ``(seed, step)``, so a resumed run reproduces the uninterrupted one.
  One training run at a time holds a workdir (``workdir.lock_workdir``).

  Returns:
    The metrics of the best evaluated checkpoint (highest mAP, evaluated again at the end
    as the reference does) with its ``epoch``, plus ``best`` and ``last``: the metrics and
    epoch of the best and of the final evaluation. Without query / gallery (a folder of
    unlabeled images and no ``eval.list``): the last ``epoch`` and the kept ``checkpoints``
    (their numbers: epochs done). Empty when nothing was trained (``train.epochs = 0``).
  """
  validation.validate_config(config, num_devices=jax.device_count(), training=True)
  # Every process runs this function; only process 0 writes files other than checkpoints
  # (orbax coordinates those itself). Every process still checks the saved config.
  primary = distributed.is_primary()
  differences = workdir_lib.check_workdir_config(workdir, config, force=force, write=False)
  with workdir_lib.lock_workdir(workdir, enabled=primary):
    return _train(config, workdir, force=force, differences=differences, primary=primary)


def _train(config: ml_collections.ConfigDict, workdir: str, *, force: bool,
           differences: list[tuple[str, Any, Any]], primary: bool) -> dict[str, Any]:
  data = loading.load_run_data(config, workdir, need_train=True)
  model = models.create_model(config.model)
  tx = make_optimizer(config.optim, config.train.iters)
  mesh = distributed.make_mesh()
  extract = make_feature_extractor(model, config)
  extract_eval = (make_feature_extractor(model, config, flip=True) if config.eval.flip
                  else extract)
  # Without an evaluation there is no best checkpoint: every eval_every-th epoch's is kept.
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      keep_every=None if data.has_eval else config.train.eval_every)
  logger.info("dataset %s: %d train / %d query / %d gallery images; %d device(s)",
              config.data.name, data.num_train, len(data.eval_dataset.query),
              len(data.eval_dataset.gallery), jax.device_count())

  # The state to start from: the latest checkpoint, or a fresh initialisation. The config
  # is saved only once it is known to resume the checkpoint.
  start_epoch, previous = 0, None
  latest = checkpointer.latest_step()
  if latest is not None:
    _check_training_set(checkpointer.read_meta(latest), data, workdir, force=force)
    try:
      restored = _restore(checkpointer, latest, model, tx, config, mesh)
    except checkpoint_lib.CheckpointError as exc:
      if not differences:
        raise
      raise checkpoint_lib.CheckpointError(
          f"The new config cannot resume {workdir}: its checkpoint {latest} holds arrays "
          "of other shapes than this config's model (" + ", ".join(
              f"{p}: {a!r} -> {b!r}" for p, a, b in differences) + "). Nothing was written; "
          "resume with the saved config (without --force), or train into a new "
          "--workdir.") from exc
    state, previous = restored.state["train_state"], _generation_of(restored)
    start_epoch = int(restored.meta["epoch"]) + 1
    logger.info("resuming from %s: epochs 0-%d done, training epoch %d next",
                checkpointer.directory, start_epoch - 1, start_epoch)
  else:
    feature_dim = models.feature_dim(model.depth, model.width)
    empty = memory_lib.init_memory(np.zeros((0, feature_dim), np.float32),
                                   config.memory.min_bucket)
    state = init_train_state(model, tx, config, empty)
  if primary:
    workdir_lib.save_workdir_config(workdir, config, differences)
  state = distributed.replicate(state, mesh)
  reporter = Reporter(config, workdir, data, start_epoch=start_epoch, num_train=data.num_train,
                      enabled=primary)
  if start_epoch == 0 and config.train.eval_initial and data.has_eval:
    reporter.initial(*evaluate_variables(extract_eval, state.variables, data, config))

  steps = TrainSteps(model, tx, config, mesh)
  t = config.train
  last: dict[str, Any] | None = None
  try:
    for epoch in range(start_epoch, t.epochs):
      timer = Timer()
      with timer.phase("extract"):
        features = extract(state.variables, data.train_images, desc=f"epoch {epoch} extract")
      with timer.phase("cluster"):
        plan = pseudo_label(features, data.train_cams if data.has_train_cams else None, config,
                            epoch=epoch, previous=previous, true_ids=data.train_ids)
      losses: dict[str, list[float]] = {}
      if plan.num_clusters:
        with timer.phase("train"):
          state, losses = train_on(plan, state, steps, data, config, epoch=epoch,
                                   checkpoint_dir=checkpointer.directory)
      else:
        logger.warning("epoch %d: the clustering found no cluster (all %d samples are "
                       "outliers); this epoch trains nothing", epoch, data.num_train)
      metrics, distmat = None, None
      if data.has_eval and ((epoch + 1) % t.eval_every == 0 or epoch == t.epochs - 1):
        with timer.phase("eval"):
          metrics, distmat = evaluate_variables(extract_eval, state.variables, data, config)
        last = dict(metrics, epoch=epoch)
      reporter.epoch(_epoch_record(epoch, plan, losses, state, metrics, timer, config), distmat)
      _save_checkpoint(checkpointer, epoch, state, plan, metrics, config, data)
      previous = plan.generation
  finally:
    # A save still in flight must complete even when the loop raises (e.g. a NaN loss).
    checkpointer.wait_until_finished()
    reporter.close()
  return _final_results(checkpointer, last, extract_eval, data, model, tx, config, mesh)


def _final_results(checkpointer, last, extract, data, model, tx, config, mesh) -> dict[str, Any]:
  """The best checkpoint's metrics (evaluated again), with ``best`` and ``last`` (see above);
  without an evaluation, the last epoch and the kept checkpoints."""
  steps = checkpointer.all_steps()
  if not steps:
    return {}
  if not data.has_eval:
    return {"epoch": steps[-1] - 1, "checkpoints": steps}

  def evaluated(step: int) -> dict[str, Any]:
    restored = _restore(checkpointer, step, model, tx, config, mesh)
    variables = distributed.replicate(restored.state["train_state"].variables, mesh)
    metrics, _ = evaluate_variables(extract, variables, data, config)
    return dict(metrics, epoch=int(restored.meta["epoch"]))

  if last is None:  # nothing was trained in this call: the run was already complete.
    last = evaluated(steps[-1])
  best_step = checkpointer.best_step()
  best = last if best_step in (None, last["epoch"] + 1) else evaluated(best_step)
  logger.info("best evaluation: epoch %d, mAP %.1f; last: epoch %d, mAP %.1f", best["epoch"],
              100 * best["mAP"], last["epoch"], 100 * last["mAP"])
  return dict(best, best=best, last=last)


def default_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                       log: bool = True) -> str | int:
  """The checkpoint read when none is named: ``config.eval.checkpoint``, except that "best"
  in a run that evaluated no checkpoint (no query / gallery) is its latest (logged)."""
  which = config.eval.checkpoint
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             read_only=True)
  steps = checkpointer.all_steps()
  if which == "best" and steps and checkpointer.best_step() is None:
    if log:
      logger.info("no checkpoint in %s was evaluated (no query / gallery): using the latest, "
                  "checkpoint %d", checkpointer.directory, steps[-1])
    return "latest"
  return which


def load_variables(config: ml_collections.ConfigDict, workdir: str,
                   checkpoint: str | int | None = None) -> tuple[Any, Any, int, int]:
  """``(model, variables, step, epoch)`` of a checkpoint of ``workdir``, or the initial model.

  ``checkpoint``: "best", "latest", a checkpoint number, the path of a checkpoint folder (of any run),
  or "init" for the initial (random or ``config.model.pretrained``) model, step 0, epoch -1.
  The default is ``config.eval.checkpoint``; a workdir without a checkpoint and a config
  with ``model.pretrained`` give the initial model (the "direct transfer" baseline), and a
  default of "best" in a run that evaluated no checkpoint (no query / gallery) gives the
  latest. Needs no dataset: usable from a user's own code.
  """
  which = default_checkpoint(config, workdir) if checkpoint is None else checkpoint
  model = models.create_model(config.model)
  tx = make_optimizer(config.optim, config.train.iters)
  mesh = distributed.make_mesh()
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             read_only=True)
  no_checkpoint = not checkpointer.all_steps()
  if which == "init" or (checkpoint is None and no_checkpoint and has_pretrained(config)):
    if which != "init":
      logger.info("no checkpoint in %s: evaluating the initial model (%s)",
                  checkpointer.directory, config.model.pretrained)
    feature_dim = models.feature_dim(model.depth, model.width)
    memory = memory_lib.init_memory(np.zeros((0, feature_dim), np.float32),
                                    config.memory.min_bucket)
    state = init_train_state(model, tx, config, memory)
    return model, distributed.replicate(state.variables, mesh), 0, -1
  if isinstance(which, str) and os.path.isdir(which):
    # A checkpoint folder of any run, e.g. runs/market/checkpoints/50.
    path = os.path.abspath(which)
    checkpointer = checkpoint_lib.Checkpointer(os.path.dirname(path), read_only=True)
    which = os.path.basename(path)
  step = checkpointer.resolve(which)
  restored = _restore(checkpointer, step, model, tx, config, mesh)
  variables = distributed.replicate(restored.state["train_state"].variables, mesh)
  return model, variables, step, int(restored.meta["epoch"])


def run_model_config(config: ml_collections.ConfigDict, workdir: str,
                     checkpoint: str | int | None) -> ml_collections.ConfigDict:
  """The config with the model settings of the run whose checkpoint is evaluated (the
  workdir's, or the run of a checkpoint folder); unchanged for ``checkpoint="init"``."""
  which = config.eval.checkpoint if checkpoint is None else checkpoint
  if which == "init":
    return config
  if isinstance(which, str) and os.path.isdir(which):  # <run>/checkpoints/<N>
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(which)))
  return workdir_lib.with_run_model_settings(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str | int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` (default ``config.eval.checkpoint``).

  Prints nothing; returns mAP / CMC / mINP with the ``checkpoint`` (its number: the epochs
  done, 0 for the initial model) and its last ``epoch``, and writes
  them to ``<workdir>/eval_<checkpoint>.json`` with a rank-list picture.
  """
  validation.validate_config(config, num_devices=None)
  config = run_model_config(config, workdir, checkpoint)
  data = loading.load_run_data(config, workdir, need_train=False)
  model, variables, step, epoch = load_variables(config, workdir, checkpoint)
  extract_eval = make_feature_extractor(model, config, flip=config.eval.flip)
  metrics, distmat = evaluate_variables(extract_eval, variables, data, config)
  results = dict(metrics, checkpoint=step, epoch=epoch)
  name = "init" if step == 0 else str(step)
  if data.cross_domain:
    name += f"_{config.eval.dataset or config.data.name}"
  if distributed.is_primary():
    write_json(os.path.join(workdir, f"eval_{name}.json"), results)
    save_rank_list(config, workdir, data, distmat, name=f"eval_{name}")
  return results


def extract(config: ml_collections.ConfigDict, workdir: str, *, split: str, out: str,
            checkpoint: str | int | None = None) -> dict[str, Any]:
  """Writes the features of ``split`` ("train", "query", "gallery") to ``out`` (.npz).

  The checkpoint is chosen as in ``evaluate`` ("init" included); query and gallery come from
  ``config.eval.dataset`` when set. Returns a summary of what was written.
  """
  validation.validate_config(config, num_devices=None)
  check_output_path(out)
  config = run_model_config(config, workdir, checkpoint)
  data = loading.load_run_data(config, workdir, need_train=split == "train")
  model, variables, step, epoch = load_variables(config, workdir, checkpoint)
  images, records = split_images(data, split)
  extractor = make_feature_extractor(model, config, flip=config.eval.flip and split != "train")
  features = extractor(variables, images, desc=f"{split} extract")
  if distributed.is_primary():
    export_features(out, features, records, split)
  return {"out": out, "split": split, "num_images": len(records),
          "feature_dim": int(features.shape[1]), "checkpoint": step, "epoch": epoch}
