"""Cluster Contrast training and evaluation (docs/algorithms.md section 1).

``train_and_evaluate(config, workdir)`` runs a whole training run and
``evaluate(config, workdir)`` scores a saved checkpoint; ``main.py`` only parses
flags and calls one of them.

Per epoch: extract features of the train images (eval mode), compute the Jaccard
distance and DBSCAN pseudo labels on the host, rebuild the cluster memory from the
centroids, then run ``train.iters`` jitted train steps over a 1-axis device mesh
(batch sharded, state replicated and donated). Evaluation every ``eval_every``
epochs; a checkpoint after every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sklearn.metrics import adjusted_rand_score
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import clustering
from ccreid_jax import distributed
from ccreid_jax import evaluation
from ccreid_jax import memory as memory_lib
from ccreid_jax import models
from ccreid_jax import tensorboard as tensorboard_lib
from ccreid_jax import validation
from ccreid_jax import workdir as workdir_lib
from ccreid_jax.data import augment as augment_lib
from ccreid_jax.data import cache as cache_lib
from ccreid_jax.data import datasets as datasets_lib
from ccreid_jax.data import sampler as sampler_lib
from ccreid_jax.data import tfds_data
from ccreid_jax.evaluation import visualize
from ccreid_jax.export import export_features, extract_split
from ccreid_jax.extract import make_extract_fn, make_mesh
from ccreid_jax.utils import MetricsWriter, Timer, format_results_table, prefetch, progress_bar

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

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# ---------------------------------------------------------------------------------------
# Building blocks.
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


def init_train_state(model: Any, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                     memory: memory_lib.MemoryState) -> TrainState:
  """Random or pretrained init of the model, and the optimizer."""
  rng = jax.random.PRNGKey(config.seed)
  init_key, aug_key = jax.random.split(rng)
  dummy = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  # One compiled program instead of ~150 small eager ones (a fresh process on 2 cores: 15 ->
  # 5 s for a tiny model); the values equal eager init's bit for bit (models.conv_init).
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(init_key, dummy)
  if _has_pretrained(config):
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


def _has_pretrained(config: ml_collections.ConfigDict) -> bool:
  """Whether ``model.pretrained`` names a weights file (not "" or "none")."""
  return config.model.get("pretrained", "") not in ("", validation.NO_PRETRAINED)


def make_train_step(model: Any, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: Mesh, *, soft_targets: bool = False) -> Callable[..., tuple[TrainState, dict]]:
  """The jitted train step: augment, forward, memory loss, Adam, memory update.

  ``step(state, images, labels)`` uses the hard cross-entropy against the memory;
  with ``soft_targets=True`` it is ``step(state, images, labels, targets)`` with per-sample
  (B, C_pad) target distributions (RLCC) and the soft-target cross-entropy. The two are
  compiled separately, so with RLCC off the step is exactly the plain Cluster Contrast one.
  """
  aug = config.augment
  mem = config.memory

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                 targets: jax.Array | None = None):
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
      return loss, (features, updates["batch_stats"])

    (loss, (features, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The memory is updated after, and outside, the gradient, with this step's features.
    centroids = memory_lib.momentum_update(
        state.memory.centroids, jax.lax.stop_gradient(features), labels, mem.momentum,
        hard=mem.hard)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        memory=state.memory.replace(centroids=centroids))
    return new_state, {"loss": loss}

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
  batch_args = (batch_sharded,) * (3 if soft_targets else 2)
  return jax.jit(
      train_step,
      in_shardings=(replicated,) + batch_args,
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )


def pseudo_labels(features: np.ndarray, cluster: ml_collections.ConfigDict) -> np.ndarray:
  """DBSCAN on the Jaccard distance, or InfoMap on the kNN graph; -1 marks outliers."""
  if cluster.method == "dbscan":
    # Only pairs within eps matter to DBSCAN, so only those are stored.
    distance = clustering.jaccard_distance(
        features, k1=cluster.k1, k2=cluster.k2, max_distance=cluster.eps)
    return clustering.dbscan_labels(distance, eps=cluster.eps, min_samples=cluster.min_samples)
  if cluster.method == "infomap":
    return clustering.infomap_labels(
        features, k=cluster.infomap_k, min_similarity=cluster.infomap_min_similarity,
        min_cluster_size=cluster.infomap_min_cluster_size)
  raise ValueError(
      f"config.cluster.method: unknown method {cluster.method!r}; accepted: 'dbscan', 'infomap'")


def _prefetch_batches(batches: Iterator[np.ndarray], images: np.ndarray, labels: np.ndarray,
                      sharding: NamedSharding, *, targets: np.ndarray | None = None,
                      num_columns: int = 0, depth: int = 2) -> Iterator[tuple[jax.Array, ...]]:
  """Gathers the next batches on a host thread and sends them to the devices early.

  Yields ``(images, labels)`` or, with ``targets`` (N, K), ``(images, labels, targets)``
  with the target rows zero-padded to ``num_columns`` (the memory bucket).
  """

  mesh = sharding.mesh

  def load(indices):
    # Every process draws the same indices (seeded sampler) and feeds its own rows.
    rows = indices[distributed.process_slice(len(indices))]
    batch = (distributed.global_batch_from_local(np.asarray(images[rows]), mesh),
             distributed.global_batch_from_local(labels[rows].astype(np.int32), mesh))
    if targets is None:
      return batch
    padded = np.zeros((len(rows), num_columns), np.float32)
    padded[:, :targets.shape[1]] = targets[rows]
    return batch + (distributed.global_batch_from_local(padded, mesh),)

  return prefetch(batches, load, depth)


def _evaluate_split(extract, variables, test_images, dataset,
                    config) -> tuple[dict[str, float], np.ndarray]:
  """``(mAP / CMC metrics, (num_query, num_gallery) distances)`` of ``dataset``'s test split."""
  features = extract(variables, test_images, desc="eval extract")
  num_query = len(dataset.query)
  query, gallery = features[:num_query], features[num_query:]
  distmat = evaluation.pairwise_distance(query, gallery)
  if config.eval.rerank:
    distmat = evaluation.rerank(
        distmat, evaluation.pairwise_distance(query, query),
        evaluation.pairwise_distance(gallery, gallery), k1=config.eval.rerank_k1,
        k2=config.eval.rerank_k2, lambda_value=config.eval.rerank_lambda)
  metrics = evaluation.evaluate_ranking(
      distmat,
      np.array([r.pid for r in dataset.query]), np.array([r.pid for r in dataset.gallery]),
      np.array([r.camid for r in dataset.query]), np.array([r.camid for r in dataset.gallery]))
  return metrics, distmat


class _Run:
  """Data, model and compiled functions shared by training and evaluation."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, need_train: bool):
    self.config = config
    self.workdir = workdir
    self.progress = bool(config.log.progress)
    cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")

    def load(name, root, need_train):
      if config.data.source == "tfds":  # root is the TFDS data_dir of a tfds_data build.
        return tfds_data.load_tfds_dataset_images(
            name, root, config.data.height, config.data.width, cache_dir,
            need_train=need_train, progress=self.progress, num_workers=config.data.num_workers)
      dataset = datasets_lib.load_dataset(name, root, skip_bad_names=config.data.skip_bad_names)
      return cache_lib.load_dataset_images(
          dataset, config.data.height, config.data.width, cache_dir, need_train=need_train,
          skip_bad_images=config.data.skip_bad_images, progress=self.progress,
          num_workers=config.data.num_workers)

    # Cross-domain evaluation: query / gallery of config.eval.dataset (at config.eval.root).
    eval_name = config.eval.dataset or config.data.name
    eval_root = config.eval.root or config.data.root
    self.cross_domain = (eval_name, eval_root) != (config.data.name, config.data.root)
    if not self.cross_domain:
      self.dataset, self.train_images, self.test_images = load(
          config.data.name, config.data.root, need_train)
      self.eval_dataset = self.dataset
    else:
      self.eval_dataset, _, self.test_images = load(eval_name, eval_root, False)
      self.dataset, self.train_images = self.eval_dataset, None
      if need_train:
        self.dataset, self.train_images, _ = load(config.data.name, config.data.root, True)
    self.mesh = make_mesh()
    # Extraction runs on this process's devices; features are all-gathered across hosts.
    self.local_mesh = distributed.local_mesh()
    self.model = models.create_model(config.model)
    self.extract_fn = make_extract_fn(self.model, self.local_mesh)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), read_only=not need_train)

  def abstract_state(self, tx, meta: dict[str, Any], feature_dim: int):
    """The tree a checkpoint with this ``meta`` holds, as shapes only."""
    bucket = int(meta["memory_bucket"])
    memory = memory_lib.MemoryState(
        centroids=jnp.zeros((bucket, feature_dim), jnp.float32), valid=jnp.zeros((bucket,), bool))
    state = jax.eval_shape(lambda: init_train_state(self.model, tx, self.config, memory))
    tree = {"train_state": state,
            "pseudo_labels": jax.ShapeDtypeStruct((int(meta["num_train"]),), jnp.int32),
            "cluster_centroids": jax.ShapeDtypeStruct(
                (max(int(meta["num_clusters"]), 1), feature_dim), jnp.float32)}
    # Restored as global arrays replicated over the mesh (what every process needs).
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), tree)

  def evaluate(self, variables) -> tuple[dict[str, float], np.ndarray]:
    """``(metrics, query x gallery distances)`` on ``eval_dataset``."""
    return _evaluate_split(self.extract, variables, self.test_images, self.eval_dataset,
                           self.config)

  def extract(self, variables, images: np.ndarray, *, desc: str) -> np.ndarray:
    """(N, D) features of uint8 ``images`` on every process (eval mode, streamed)."""
    return distributed.extract_and_allgather(
        self.extract_fn, variables, images, mesh=self.local_mesh,
        batch_size=self.config.eval.batch_size, progress=self.progress, desc=desc)

  def report_evaluation(self, tb: tensorboard_lib.TensorBoardWriter | None, distmat: np.ndarray,
                        *, step: int, name: str) -> None:
    """Saves ``<workdir>/ranklist_<name>.png`` and sends it to TensorBoard (if any) at ``step``."""
    log = self.config.log
    if log.ranklist_queries <= 0 or not distributed.is_primary():
      return
    queries = visualize.choose_queries(len(self.eval_dataset.query), log.ranklist_queries,
                                       self.config.seed)
    query, gallery = self.eval_dataset.query, self.eval_dataset.gallery
    if self.config.data.source == "tfds":
      # TFDS record paths are not files: draw the decoded (cached) images instead.
      query_images, gallery_images = self.test_images[:len(query)], self.test_images[len(query):]
    else:
      query_images, gallery_images = [r.path for r in query], [r.path for r in gallery]
    image = visualize.rank_list_image(
        query_images, [r.pid for r in query], [r.camid for r in query], gallery_images,
        [r.pid for r in gallery], [r.camid for r in gallery], distmat, query_indices=queries,
        topk=log.ranklist_topk)
    visualize.save_png(os.path.join(self.workdir, f"ranklist_{name}.png"), image)
    if tb is not None:
      tb.image("ranklist", step, image)


# ---------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       force: bool = False) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns the last evaluation's metrics.

  A killed run restarts from its latest checkpoint when called again with the same
  ``workdir``; per-epoch randomness is derived from ``(seed, epoch)`` and per-step
  randomness from ``(seed, step)``, so a resumed run reproduces the uninterrupted one.
  """
  validation.validate_config(config, num_devices=jax.device_count(), training=True)
  # Every process runs this function; only process 0 writes files other than checkpoints
  # (orbax coordinates those itself). Every process still checks the saved config.
  primary = distributed.is_primary()
  workdir_lib.check_workdir_config(workdir, config, force=force, write=primary)
  run = _Run(config, workdir, need_train=True)
  t = config.train
  writer = MetricsWriter(workdir, enabled=primary)
  tx = make_optimizer(config.optim, t.iters)
  feature_dim = models.feature_dim(config.model.depth, config.model.width)
  num_train = len(run.dataset.train)
  cams = np.array([r.camid for r in run.dataset.train])
  true_ids = np.array([r.pid for r in run.dataset.train])
  logger.info("dataset %s: %d train / %d query / %d gallery images; %d device(s)",
              config.data.name, num_train, len(run.dataset.query), len(run.dataset.gallery),
              jax.device_count())

  start_epoch = 0
  previous: _Generation | None = None  # Last epoch's clustering, for RLCC.
  latest = run.checkpointer.latest_step()
  if latest is not None:
    meta = run.checkpointer.read_meta(latest)
    restored = run.checkpointer.restore(latest, run.abstract_state(tx, meta, feature_dim))
    state = restored.state["train_state"]
    start_epoch = int(meta["epoch"]) + 1
    if int(meta["num_clusters"]) > 0:
      previous = _Generation(
          labels=np.asarray(restored.state["pseudo_labels"]).astype(np.int64),
          centroids=np.asarray(restored.state["cluster_centroids"])[:int(meta["num_clusters"])])
    logger.info("resuming from %s (epoch %d done)", run.checkpointer.directory, start_epoch)
  else:
    empty_memory = memory_lib.init_memory(
        np.zeros((0, feature_dim), np.float32), config.memory.min_bucket)
    state = init_train_state(run.model, tx, config, empty_memory)
  if primary:
    workdir_lib.prune_metrics(workdir, start_epoch)  # Records a killed run wrote past its checkpoint.
  state = distributed.replicate(state, run.mesh)
  # TensorBoard step = epochs done; a resumed run hides what a killed attempt wrote from here.
  tb = tensorboard_lib.TensorBoardWriter(
      os.path.join(workdir, "tensorboard"), purge_step=start_epoch + 1 if start_epoch else 0,
      enabled=config.log.tensorboard and primary)

  if start_epoch == 0 and t.eval_initial:
    initial, distmat = run.evaluate(state.variables)
    writer.write("initial", **initial)
    tb.write_record("initial", **initial)
    run.report_evaluation(tb, distmat, step=0, name="init")
    logger.info("initial features (before training): mAP %.1f rank1 %.1f",
                100 * initial["mAP"], 100 * initial["rank1"])

  hard_step = make_train_step(run.model, tx, config, run.mesh)
  soft_step = (make_train_step(run.model, tx, config, run.mesh, soft_targets=True)
               if config.rlcc.enabled else None)
  batch_sharding = NamedSharding(run.mesh, PartitionSpec("data"))
  results: dict[str, Any] = {}
  # (soft targets?, memory rows) of the train steps compiled so far in this process: a new
  # pair compiles the step again (about 20 s for ResNet-50 on one H200), so it is logged.
  compiled: set[tuple[bool, int]] = set()
  try:
    for epoch in range(start_epoch, t.epochs):
      timer = Timer()
      record: dict[str, Any] = {"epoch": epoch}
      with timer.phase("extract"):
        features = run.extract(state.variables, run.train_images, desc=f"epoch {epoch} extract")
      with timer.phase("cluster"):
        labels = pseudo_labels(features, config.cluster)
        record["outliers"] = int((labels < 0).sum())
        if config.rlcc.enabled and config.rlcc.outliers_as_singletons:
          labels = clustering.keep_outliers_as_singletons(labels)
        num_clusters = int(labels.max()) + 1 if labels.size else 0
        record["clusters"] = num_clusters
        # Diagnostic only (never used for training): agreement with the true train ids.
        record["cluster_ari"] = float(adjusted_rand_score(true_ids, labels))
        current = (_Generation(labels=labels, centroids=clustering.cluster_centroids(features, labels))
                   if num_clusters > 0 else None)
        targets = None
        if config.rlcc.enabled and current is not None and previous is not None:
          targets, stats = rlcc_targets(features, current, previous, config.rlcc, epoch)
          record.update({f"rlcc_{k}": v for k, v in stats.items()})

      losses: list[float] = []
      if current is None:
        logger.warning("epoch %d: DBSCAN found no cluster (all %d samples are outliers); "
                       "skipping this epoch's training", epoch, num_train)
      else:
        bucket = memory_lib.bucket_size(num_clusters, config.memory.min_bucket)
        record["memory_bucket"] = bucket
        variant = (targets is not None, bucket)
        if compiled and variant not in compiled:
          logger.info("epoch %d: %d clusters, a %d-row memory%s: the train step compiles for it "
                      "(once per size)", epoch, num_clusters, bucket,
                      " with soft targets" if targets is not None else "")
        compiled.add(variant)
        memory = distributed.replicate(memory_lib.init_memory(current.centroids, bucket), run.mesh)
        state = state.replace(memory=memory)
        sampler = sampler_lib.CameraAwarePKSampler(
            labels, cams, t.num_instances,
            seed=int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]))
        batches = _prefetch_batches(
            sampler.batches(t.iters, t.batch_size), run.train_images, labels, batch_sharding,
            targets=targets, num_columns=bucket)
        step_fn = hard_step if targets is None else soft_step
        with timer.phase("train"):
          state, losses = _train_epoch(step_fn, state, batches, epoch, t, run)
      previous = current

      evaluated = (epoch + 1) % t.eval_every == 0 or epoch == t.epochs - 1
      metrics_out: dict[str, float] | None = None
      if evaluated:
        with timer.phase("eval"):
          metrics_out, distmat = run.evaluate(state.variables)
        results = dict(metrics_out)
      mean_loss = float(np.mean(losses)) if losses else float("nan")
      record.update(loss=mean_loss, steps=int(state.step),
                    lr=float(make_lr_schedule(config.optim, t.iters)(jnp.int32(epoch * t.iters))),
                    **{f"time_{k}": v for k, v in timer.seconds.items()})
      if metrics_out is not None:
        record.update(metrics_out)
      writer.write("epoch", **record)
      tb.write_record("epoch", **record)
      if metrics_out is not None:
        run.report_evaluation(tb, distmat, step=epoch + 1, name=f"epoch{epoch}")
      if primary:
        visualize.save_training_curves(os.path.join(workdir, "curves.png"),
                                       workdir_lib.read_metrics_lines(workdir)[0],
                                       num_train=num_train)
      tb.flush()
      logger.info(_epoch_line(record, timer))

      meta = {"epoch": epoch, "memory_bucket": int(state.memory.centroids.shape[0]),
              "num_clusters": num_clusters, "num_train": num_train, "seed": config.seed}
      if metrics_out is not None:
        meta["metrics"] = {k: float(v) for k, v in metrics_out.items()}
      centroids = (current.centroids if current is not None
                   else np.zeros((1, feature_dim), np.float32))
      run.checkpointer.save(
          epoch + 1,
          {"train_state": state, "pseudo_labels": labels.astype(np.int32),
           "cluster_centroids": centroids.astype(np.float32)},
          meta)
  finally:
    # A save still in flight must complete even when the loop raises (e.g. a NaN loss).
    run.checkpointer.wait_until_finished()
    tb.close()
  if not results and t.epochs > 0:
    results = evaluate(config, workdir, checkpoint="latest")
  return results


@dataclasses.dataclass(frozen=True)
class _Generation:
  """One epoch's clustering: labels (-1 = outlier) and L2-normalised centroids (K, D)."""

  labels: np.ndarray
  centroids: np.ndarray


def rlcc_targets(features: np.ndarray, current: _Generation, previous: _Generation,
                 rlcc: ml_collections.ConfigDict, epoch: int) -> tuple[np.ndarray, dict]:
  """RLCC soft targets (N, K) for this epoch and the consensus statistics to log.

  ``P = q`` on the first RLCC epoch (epoch 1), alpha-mixed with the previous one-hot
  from epoch 2 on (docs/algorithms.md section 6).
  """
  consensus = clustering.consensus_matrix(
      previous.labels, current.labels, num_prev_clusters=previous.centroids.shape[0],
      num_clusters=current.centroids.shape[0])
  targets = clustering.soft_labels(
      features, current.labels, previous.labels, previous.centroids,
      use_prev_onehot=epoch >= 2, alpha=rlcc.alpha, beta=rlcc.beta, pred_temp=rlcc.pred_temp,
      consensus=consensus)
  stats = clustering.consensus_stats(
      previous.labels, current.labels, targets, num_prev_clusters=previous.centroids.shape[0],
      consensus=consensus)
  return targets, stats


def _train_epoch(step_fn, state: TrainState, batches, epoch: int, t: ml_collections.ConfigDict,
                 run: _Run) -> tuple[TrainState, list[float]]:
  """Runs ``t.iters`` steps; fetches the losses every ``t.log_every`` steps."""
  losses: list[float] = []
  pending: list[jax.Array] = []
  bar = progress_bar(total=t.iters, desc=f"epoch {epoch} train", unit="step",
                     enabled=run.progress)
  for it, batch in enumerate(batches):
    state, metrics = step_fn(state, *batch)
    pending.append(metrics["loss"])
    if len(pending) == t.log_every or it == t.iters - 1:
      values = [float(v) for v in jax.device_get(pending)]
      pending = []
      if not np.all(np.isfinite(values)):
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch} step {it}: {values}; the last good "
            f"checkpoint is kept in {run.checkpointer.directory}")
      losses.extend(values)
      bar.set_postfix(loss=f"{values[-1]:.3f}")
    bar.update(1)
  bar.close()
  return state, losses


def _epoch_line(record: dict[str, Any], timer: Timer) -> str:
  line = (f"epoch {record['epoch']:3d} | clusters {record['clusters']:5d} | "
          f"outliers {record['outliers']:6d} | ARI {record['cluster_ari']:.3f} | loss {record['loss']:.4f} | " +
          " ".join(f"{k} {v:.1f}s" for k, v in timer.seconds.items()))
  if "rlcc_num_dissolved" in record:
    line += (f" | rlcc dissolved {record['rlcc_num_dissolved']} new {record['rlcc_num_new']} "
             f"max(y~) {record['rlcc_mean_max_target']:.3f} "
             f"argmax!=y {record['rlcc_frac_argmax_changed']:.3f}")
  if "mAP" in record:
    line += f" | mAP {100 * record['mAP']:.1f} rank1 {100 * record['rank1']:.1f}"
  return line


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str | int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` (default ``config.eval.checkpoint``).

  Prints nothing; returns mAP / CMC and writes them to ``<workdir>/eval_<step>.json``.
  """
  validation.validate_config(config, num_devices=None)
  run = _Run(config, workdir, need_train=False)
  variables, step, epoch = _load_variables(run, checkpoint)
  metrics, distmat = run.evaluate(variables)
  results = dict(metrics, step=step, epoch=epoch)
  name = "init" if step == 0 else str(step)
  if run.cross_domain:
    name += f"_{config.eval.dataset or config.data.name}"
  if distributed.is_primary():
    with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  run.report_evaluation(None, distmat, step=step, name=f"eval_{name}")
  return results


def _load_variables(run: _Run, checkpoint: str | int | None) -> tuple[Any, int, int]:
  """``(variables, step, epoch)`` of a checkpoint, or of the initial model (step 0, epoch -1).

  The initial (random or ``config.model.pretrained``) model is used for ``checkpoint="init"``,
  and when no checkpoint is named, the workdir holds none and ``model.pretrained`` is set:
  the "direct transfer" baseline.
  """
  config = run.config
  which = config.eval.checkpoint if checkpoint is None else checkpoint
  tx = make_optimizer(config.optim, config.train.iters)
  feature_dim = models.feature_dim(config.model.depth, config.model.width)
  no_checkpoint = not run.checkpointer.all_steps()
  if which == "init" or (checkpoint is None and no_checkpoint and _has_pretrained(config)):
    if which != "init":
      logger.info("no checkpoint in %s: evaluating the initial model (%s)",
                  run.checkpointer.directory, config.model.pretrained)
    memory = memory_lib.init_memory(np.zeros((0, feature_dim), np.float32),
                                    config.memory.min_bucket)
    state = init_train_state(run.model, tx, config, memory)
    return distributed.replicate(state.variables, run.mesh), 0, -1
  checkpointer = run.checkpointer
  if isinstance(which, str) and os.path.isdir(which):
    # A step folder of any run, e.g. runs/market/checkpoints/50.
    path = os.path.abspath(which)
    checkpointer = checkpoint_lib.Checkpointer(os.path.dirname(path), read_only=True)
    which = os.path.basename(path)
  step = checkpointer.resolve(which)
  meta = checkpointer.read_meta(step)
  restored = checkpointer.restore(step, run.abstract_state(tx, meta, feature_dim))
  state = distributed.replicate(restored.state["train_state"], run.mesh)
  return state.variables, step, int(meta["epoch"])


def extract(config: ml_collections.ConfigDict, workdir: str, *, split: str, out: str,
            checkpoint: str | int | None = None) -> dict[str, Any]:
  """Writes the features of ``split`` ("train", "query", "gallery") to ``out`` (.npz).

  The checkpoint is chosen as in ``evaluate`` ("init" included); query and gallery come from
  ``config.eval.dataset`` when set. Returns a summary of what was written.
  """
  validation.validate_config(config, num_devices=None)
  run = _Run(config, workdir, need_train=split == "train")
  variables, step, epoch = _load_variables(run, checkpoint)
  features, records = extract_split(run, variables, split)
  if distributed.is_primary():
    export_features(out, features, records, split)
  return {"out": out, "split": split, "num_images": len(records),
          "feature_dim": int(features.shape[1]), "step": step, "epoch": epoch}

