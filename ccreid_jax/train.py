"""Cluster Contrast training (docs/algorithms.md section 1): the step and the epoch loop.

``train_and_evaluate(config, workdir)`` runs (or resumes) a whole training run in a run folder
(``run.Run``). An epoch is four phases, each a function of its own:

* extraction: the train features in eval mode, on every device (``extract.FeatureExtractor``);
* pseudo-labelling on the host (``pseudo_labels.pseudo_label``): the clustering, the memory's
  centroids, the RLCC targets and the epoch's cluster statistics;
* training on those labels (``train_on``): the memory, the camera-aware sampler, batches
  prefetched to the devices, ``train.iters`` jitted steps over a 1-axis device mesh (batch
  sharded, state replicated and donated);
* evaluation every ``eval_every`` epochs and after the last one.

A ``reporting.Reporter`` writes each epoch's record (metrics.jsonl, TensorBoard, pictures, the
log line) and a checkpoint is saved after every epoch. The state itself (``state.TrainState``:
variables, optimizer, memory, and the model's and optimizer's functions) is defined in
``state.py``, so the run folder can restore it without the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax import camera_memory, distributed, models, validation
from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import memory as memory_lib
from ccreid_jax import state as state_lib
from ccreid_jax.data import augment as augment_lib
from ccreid_jax.data import loading
from ccreid_jax.data import sampler as sampler_lib
from ccreid_jax.extract import FeatureExtractor, evaluate_variables, with_precision
from ccreid_jax.pseudo_labels import Generation, PseudoLabels, pseudo_label
from ccreid_jax.reporting import Reporter
from ccreid_jax.run import Run
from ccreid_jax.state import TrainState
from ccreid_jax.utils import Timer, prefetch, progress_bar

__all__ = [
  "TrainSteps",
  "TrainingSetChanged",
  "make_train_step",
  "prefetch_batches",
  "train_and_evaluate",
  "train_on",
]

logger = logging.getLogger("ccreid_jax")


# ---------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------


def make_train_step(
  config: ml_collections.ConfigDict, mesh: Mesh, *, soft_targets: bool = False, camera: bool = False
) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
  """The jitted train step: augment, forward, memory loss, Adam, memory update.

  The model and the optimizer are the state's (``state.apply_fn``, ``state.tx``).

  ``step(state, images, labels)`` uses the hard cross-entropy against the memory;
  with ``soft_targets=True`` it is ``step(state, images, labels, targets)`` with per-sample
  (B, C_pad) target distributions (RLCC) and the soft-target cross-entropy. With
  ``camera=True`` the batch's cameras follow the labels (``step(state, images, labels,
  cameras[, targets])``) and ``config.camera.weight`` times the inter-camera proxy loss against
  ``state.camera`` is added; the proxies then move with ``config.camera.momentum`` after the
  gradient, like the memory. Each variant is compiled separately, so with RLCC and the camera
  term off the step is exactly the plain Cluster Contrast one.
  """
  aug = config.augment
  mem = config.memory
  cam = config.camera

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *rest: jax.Array):
    cameras = rest[0] if camera else None
    targets = rest[-1] if soft_targets else None
    key = jax.random.fold_in(state.rng, state.step)
    x = augment_lib.train_augment(
      key, images, flip_prob=aug.flip_prob, pad=aug.pad, erasing_prob=aug.erasing_prob
    )

    def loss_fn(params):
      features, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      if targets is None:
        loss = memory_lib.contrastive_loss(
          features, state.memory.centroids, labels, mem.temperature, valid=state.memory.valid
        )
      else:
        loss = memory_lib.soft_contrastive_loss(
          features, state.memory.centroids, targets, mem.temperature, valid=state.memory.valid
        )
      metrics = {"loss": loss}
      if camera:
        assert state.camera is not None and cameras is not None  # camera=True: both given
        camera_loss = camera_memory.camera_proxy_loss(
          features,
          state.camera,
          labels,
          cameras,
          temperature=cam.temperature,
          num_hard_negatives=cam.num_hard_negatives,
        )
        loss = loss + cam.weight * camera_loss
        metrics = {"loss": loss, "camera_loss": camera_loss}
      return loss, (features, updates["batch_stats"], metrics)

    (_, (features, batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The memory is updated after, and outside, the gradient, with this step's features.
    features = jax.lax.stop_gradient(features)
    new_state = dataclasses.replace(
      state,
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      memory=memory_lib.update_centroids(state.memory, features, labels, mem),
    )
    if camera:
      assert state.camera is not None and cameras is not None  # camera=True: both given
      new_state = dataclasses.replace(
        new_state,
        camera=camera_memory.camera_proxy_update(
          state.camera, features, labels, cameras, cam.momentum
        ),
      )
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

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.mesh = mesh
    self._make = functools.partial(make_train_step, config, mesh)
    self._steps: dict[tuple[bool, bool], Callable[..., tuple[TrainState, dict[str, Any]]]] = {}
    self._seen: set[tuple[bool, int, int]] = set()

  def get(
    self, *, soft: bool, bucket: int, camera_bucket: int, epoch: int, num_clusters: int
  ) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """The step for soft / hard targets, a memory of ``bucket`` rows and ``camera_bucket``
    proxy rows (0: no camera term)."""
    variant = (soft, bucket, camera_bucket)
    if self._seen and variant not in self._seen:
      logger.info(
        "epoch %d: %d clusters, a %d-row memory%s%s: the train step compiles for "
        "it (once per size)",
        epoch,
        num_clusters,
        bucket,
        " with soft targets" if soft else "",
        f" and {camera_bucket} camera proxy rows" if camera_bucket else "",
      )
    self._seen.add(variant)
    kind = (soft, bool(camera_bucket))
    if kind not in self._steps:
      self._steps[kind] = self._make(soft_targets=soft, camera=bool(camera_bucket))
    return self._steps[kind]


def prefetch_batches(
  batches: Iterator[np.ndarray],
  images: np.ndarray,
  labels: np.ndarray,
  sharding: NamedSharding,
  *,
  cameras: np.ndarray | None = None,
  targets: np.ndarray | None = None,
  num_columns: int = 0,
  depth: int = 2,
) -> Iterator[tuple[jax.Array, ...]]:
  """Gathers the next batches on a host thread and sends them to the devices early.

  Yields ``(images, labels)``, followed by the cameras when ``cameras`` (N,) is given and by
  the target rows when ``targets`` (N, K) is given (zero-padded to ``num_columns``, the
  memory bucket): the arguments of the train step after the state.
  """

  mesh = sharding.mesh
  assert isinstance(mesh, Mesh)  # a concrete device mesh, not an abstract one

  def load(indices):
    # Every process draws the same indices (seeded sampler) and feeds its own rows.
    rows = indices[distributed.process_slice(len(indices))]
    batch: tuple[jax.Array, ...] = (
      distributed.global_batch_from_local(np.asarray(images[rows]), mesh),
      distributed.global_batch_from_local(labels[rows].astype(np.int32), mesh),
    )
    if cameras is not None:
      batch += (distributed.global_batch_from_local(cameras[rows].astype(np.int32), mesh),)
    if targets is None:
      return batch
    padded = np.zeros((len(rows), num_columns), np.float32)
    padded[:, : targets.shape[1]] = targets[rows]
    return batch + (distributed.global_batch_from_local(padded, mesh),)

  return prefetch(batches, load, depth)


def train_on(
  plan: PseudoLabels,
  state: TrainState,
  steps: TrainSteps,
  data: loading.RunData,
  config: ml_collections.ConfigDict,
  *,
  epoch: int,
  checkpoints_dir: str = "the run's checkpoints folder",
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
  state = dataclasses.replace(
    state, memory=distributed.replicate(memory, steps.mesh), camera=camera
  )
  sampler = sampler_lib.CameraAwarePKSampler(
    plan.labels,
    data.train_cameras,
    t.num_instances,
    seed=int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]),
  )
  assert data.train_images is not None  # training loads the train split
  batches = prefetch_batches(
    sampler.batches(t.iters, t.batch_size),
    data.train_images,
    plan.labels,
    NamedSharding(steps.mesh, PartitionSpec("data")),
    cameras=None if camera is None else data.train_cameras,
    targets=plan.targets,
    num_columns=bucket,
  )
  step_fn = steps.get(
    soft=plan.targets is not None,
    bucket=bucket,
    camera_bucket=0 if camera is None else camera.bucket,
    epoch=epoch,
    num_clusters=plan.num_clusters,
  )
  losses: dict[str, list[float]] = {}
  pending: list[dict[str, jax.Array]] = []
  bar = progress_bar(
    total=t.iters, desc=f"epoch {epoch} train", unit="step", enabled=bool(config.log.progress)
  )
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
          f"earlier epochs are kept in {checkpoints_dir}"
        )
      for m in fetched:
        for name, value in m.items():
          losses.setdefault(name, []).append(float(value))
      bar.set_postfix(loss=f"{values[-1]:.3f}")
    bar.update(1)
  bar.close()
  return state, losses


# ---------------------------------------------------------------------------------------
# The epoch loop.
# ---------------------------------------------------------------------------------------


# What to do about an epoch with one cluster or none (logged, and in the final summary).
DEGENERATE_ADVICE = (
  "Choose cluster.eps with the eps sweep (python -m ccreid_jax.main --mode "
  "sweep --checkpoint init --eps 0.3:0.8:0.05), and check cluster.min_samples "
  "and cluster.k1 against the number of train images."
)


def _epoch_record(
  epoch: int,
  plan: PseudoLabels,
  losses: dict[str, list[float]],
  state: TrainState,
  metrics: dict[str, float] | None,
  timer: Timer,
  config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  record: dict[str, Any] = {"epoch": epoch, **plan.stats}
  if plan.num_clusters:
    record["memory_bucket"] = memory_lib.bucket_size(plan.num_clusters, config.memory.min_bucket)
  if "camera_loss" in losses:
    record["camera_loss"] = float(np.mean(losses["camera_loss"]))
  if losses:
    # The loss over the first and the last tenth of the epoch's steps: how it moves within an
    # epoch (a memory kept hard, as BMW's push keeps it, makes it rise).
    tenth = max(1, len(losses["loss"]) // 10)
    record.update(
      loss_start=float(np.mean(losses["loss"][:tenth])),
      loss_end=float(np.mean(losses["loss"][-tenth:])),
    )
  record.update(
    loss=float(np.mean(losses["loss"])) if losses else float("nan"),
    steps=int(state.step),
    lr=float(
      state_lib.make_lr_schedule(config.optim, config.train.iters)(
        jnp.int32(epoch * config.train.iters)
      )
    ),
    **{f"time_{k}": v for k, v in timer.seconds.items()},
  )
  if metrics is not None:
    record.update(metrics)
  return record


class TrainingSetChanged(ValueError):
  """A resumed run's training images are not the ones its checkpoints were trained on."""


def _check_training_set(
  meta: dict[str, Any], data: loading.RunData, run: Run, *, force: bool
) -> None:
  """Refuses to resume on other training images (a changed count always; other images of the
  same count unless ``force``)."""
  saved_count, saved = int(meta["num_train"]), meta.get("train_fingerprint")
  current = data.train_fingerprint
  if saved_count == data.num_train and saved in (None, current):
    return
  what = (
    f"{run.path} was trained on {saved_count} images"
    + (f" (fingerprint {saved})" if saved else "")
    + f"; {data.dataset.root} now gives "
    f"{data.num_train} (fingerprint {current})"
  )
  if saved_count != data.num_train or not force:
    raise TrainingSetChanged(
      f"The training set differs from the one this run was trained on: {what}. Resuming "
      "would continue on other images and mix evaluations of two datasets in one history. "
      "Point config.data.root at the original images, or train into a new --workdir"
      + (
        "."
        if saved_count != data.num_train
        else " (--force resumes anyway: the image count is the same)."
      )
    )
  logger.warning("--force: resuming on a changed training set: %s", what)


@dataclasses.dataclass(frozen=True)
class _Setup:
  """The compiled pieces of one training run."""

  model: models.ReIDResNet
  mesh: Mesh
  extract: FeatureExtractor  # the train features (no flip: clustering never flips).
  extract_eval: FeatureExtractor  # the evaluation's (with the flip test when asked for).
  steps: TrainSteps


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, force: bool = False
) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns its best and last evaluations.

  A killed run restarts from its latest checkpoint when called again with the same
  ``workdir``; per-epoch randomness is derived from ``(seed, epoch)`` and per-step
  randomness from ``(seed, step)``, so a resumed run reproduces the uninterrupted one.
  One training run at a time holds a workdir (``Run.lock``).

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
  run = Run(workdir)
  differences = run.check_config(config, force=force, write=False)
  with run.lock(enabled=primary):
    return _train(config, run, force=force, differences=differences, primary=primary)


def _train(
  config: ml_collections.ConfigDict,
  run: Run,
  *,
  force: bool,
  differences: list[tuple[str, Any, Any]],
  primary: bool,
) -> dict[str, Any]:
  data = loading.load_run_data(config, run.path, need_train=True)
  assert data.train_images is not None  # need_train=True
  validation.check_cluster_sizes(config.cluster, data.num_train)
  model = models.create_model(config.model)
  mesh = distributed.make_mesh()
  extract = FeatureExtractor.create(model, config)
  setup = _Setup(
    model=model,
    mesh=mesh,
    extract=extract,
    extract_eval=(
      FeatureExtractor.create(model, config, flip=True) if config.eval.flip else extract
    ),
    steps=TrainSteps(config, mesh),
  )
  # Without an evaluation there is no best checkpoint: every eval_every-th epoch's is kept.
  checkpointer = run.checkpointer(keep_every=None if data.has_eval else config.train.eval_every)
  logger.info(
    "dataset %s: %d train / %d query / %d gallery images; %d device(s)",
    config.data.name,
    data.num_train,
    len(data.eval_dataset.query),
    len(data.eval_dataset.gallery),
    jax.device_count(),
  )

  # The state to start from: the latest checkpoint, or a fresh initialisation. The config
  # is saved only once it is known to resume the checkpoint.
  start_epoch, previous = 0, None
  latest = checkpointer.latest()
  if latest is not None:
    _check_training_set(checkpointer.read_meta(latest), data, run, force=force)
    try:
      state, previous, meta = run.restore(latest, model, config, mesh, checkpointer=checkpointer)
    except checkpoint_lib.CheckpointError as exc:
      if not differences:
        raise
      raise checkpoint_lib.CheckpointError(
        f"The new config cannot resume {run.path}: its checkpoint {latest} holds arrays "
        "of other shapes than this config's model ("
        + ", ".join(f"{p}: {a!r} -> {b!r}" for p, a, b in differences)
        + "). Nothing was written; "
        "resume with the saved config (without --force), or train into a new "
        "--workdir."
      ) from exc
    start_epoch = int(meta["epoch"]) + 1
    logger.info(
      "resuming from %s: epochs 0-%d done, training epoch %d next",
      checkpointer.directory,
      start_epoch - 1,
      start_epoch,
    )
  else:
    state = state_lib.create_train_state(model, config)
  if primary:
    run.save_config(config, differences)
  state = distributed.replicate(state, mesh)
  reporter = Reporter(
    config, run, data, start_epoch=start_epoch, num_train=data.num_train, enabled=primary
  )
  if start_epoch == 0 and config.train.eval_initial and data.has_eval:
    reporter.initial(*evaluate_variables(setup.extract_eval, state.variables, data, config))

  t = config.train
  last: dict[str, Any] | None = None
  try:
    for epoch in range(start_epoch, t.epochs):
      timer = Timer()
      with timer.phase("extract"):
        features = setup.extract(state.variables, data.train_images, desc=f"epoch {epoch} extract")
      with timer.phase("cluster"):
        plan = pseudo_label(
          features,
          data.train_cameras if data.has_train_cameras else None,
          config,
          epoch=epoch,
          previous=previous,
          true_identities=data.train_identities,
        )
      losses: dict[str, list[float]] = {}
      if plan.num_clusters:
        with timer.phase("train"):
          state, losses = train_on(
            plan,
            state,
            setup.steps,
            data,
            config,
            epoch=epoch,
            checkpoints_dir=checkpointer.directory,
          )
        if plan.num_clusters == 1:
          logger.warning(
            "WARNING epoch %d: the clustering put every clustered image in one "
            "cluster; the loss of one class is 0 and this epoch learns nothing. "
            "%s",
            epoch,
            DEGENERATE_ADVICE,
          )
      else:
        logger.warning(
          "WARNING epoch %d: the clustering found no cluster (all %d samples are "
          "outliers); this epoch trains nothing. %s",
          epoch,
          data.num_train,
          DEGENERATE_ADVICE,
        )
      metrics, distmat = None, None
      if data.has_eval and ((epoch + 1) % t.eval_every == 0 or epoch == t.epochs - 1):
        with timer.phase("eval"):
          metrics, distmat = evaluate_variables(setup.extract_eval, state.variables, data, config)
        last = dict(metrics, epoch=epoch)
      reporter.epoch(_epoch_record(epoch, plan, losses, state, metrics, timer, config), distmat)
      _save_checkpoint(checkpointer, epoch, state, plan, metrics, config, data)
      previous = plan.generation
  finally:
    # A save still in flight must complete even when the loop raises (e.g. a NaN loss).
    checkpointer.wait_until_finished()
    reporter.close()
  return _final_results(run, checkpointer, last, setup, data, config)


def _final_results(
  run: Run,
  checkpointer: checkpoint_lib.Checkpointer,
  last: dict[str, Any] | None,
  setup: _Setup,
  data: loading.RunData,
  config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """The best checkpoint's metrics (evaluated again), with ``best`` and ``last`` (see
  ``train_and_evaluate``); without an evaluation, the last epoch and the kept checkpoints."""
  numbers = checkpointer.numbers()
  if not numbers:
    return {}
  if not data.has_eval:
    return {"epoch": numbers[-1] - 1, "checkpoints": numbers}

  def evaluated(number: int) -> dict[str, Any]:
    state, _, meta = run.restore(number, setup.model, config, setup.mesh, checkpointer=checkpointer)
    variables = distributed.replicate(state.variables, setup.mesh)
    metrics, _ = evaluate_variables(setup.extract_eval, variables, data, config)
    return dict(metrics, epoch=int(meta["epoch"]))

  if last is None:  # nothing was trained in this call: the run was already complete.
    last = evaluated(numbers[-1])
  best_number = checkpointer.best()
  best = last if best_number in (None, last["epoch"] + 1) else evaluated(best_number)
  logger.info(
    "best evaluation: epoch %d, mAP %.1f; last: epoch %d, mAP %.1f",
    best["epoch"],
    100 * best["mAP"],
    last["epoch"],
    100 * last["mAP"],
  )
  return dict(best, best=best, last=last)


def _save_checkpoint(
  checkpointer: checkpoint_lib.Checkpointer,
  epoch: int,
  state: TrainState,
  plan: PseudoLabels,
  metrics: dict[str, float] | None,
  config: ml_collections.ConfigDict,
  data: loading.RunData,
) -> None:
  """Checkpoint ``epoch + 1``: the state, the epoch's clustering and what a resume checks."""
  generation: Generation = plan.generation
  meta = {
    "epoch": epoch,
    "memory_bucket": int(state.memory.centroids.shape[0]),
    "num_clusters": generation.num_clusters,
    "num_train": data.num_train,
    "train_fingerprint": data.train_fingerprint,
    "seed": config.seed,
  }
  if generation.indep_threshold is not None:
    meta["indep_threshold"] = generation.indep_threshold
  if metrics is not None:
    meta["metrics"] = {k: float(v) for k, v in metrics.items()}
  checkpointer.save(epoch + 1, state_lib.checkpoint_tree(state, generation), meta)
