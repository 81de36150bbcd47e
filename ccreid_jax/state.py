"""The train state: the model's variables, the optimizer and the cluster memory, as one value.

``TrainState`` carries the functions a step needs (``apply_fn``: the model's ``apply``;
``tx``: the optimizer) beside its arrays, as flax's own ``TrainState`` does, so a step, a
restore or an evaluation takes the state and nothing threaded beside it.

A checkpoint holds ``checkpoint_tree(state, generation)``: every array field but the
camera-aware proxies (rebuilt from each epoch's clustering), the epoch's pseudo labels and
its clustering centroids. ``abstract_checkpoint`` gives that tree's shapes for orbax to
restore into, and ``from_checkpoint`` turns a restored tree back into a ``TrainState`` and
the ``pseudo_labels.Generation`` the next epoch continues from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from ccreid_jax import camera_memory, models, validation
from ccreid_jax import memory as memory_lib
from ccreid_jax.pseudo_labels import Generation

__all__ = [
  "SAVED_FIELDS",
  "TrainState",
  "abstract_checkpoint",
  "checkpoint_tree",
  "create_train_state",
  "empty_memory",
  "from_checkpoint",
  "has_pretrained",
  "make_lr_schedule",
  "make_optimizer",
]

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; donated to the step.

  ``apply_fn`` and ``tx`` are static: they belong to the state's type (a jitted step is
  compiled for them), not to its arrays, and a checkpoint holds neither.
  """

  step: jax.Array  # int32 scalar: optimizer updates done so far.
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: memory_lib.MemoryState
  rng: jax.Array  # uint32 (2,): base key of the augmentation stream.
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # The camera-aware proxies of the epoch (rebuilt every epoch, never checkpointed), or None.
  camera: camera_memory.CameraProxyState | None = None

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# Fields a checkpoint keeps: the arrays, less the camera proxies every epoch rebuilds.
SAVED_FIELDS = ("step", "params", "batch_stats", "opt_state", "memory", "rng")


def make_lr_schedule(optim: ml_collections.ConfigDict, iters_per_epoch: int) -> optax.Schedule:
  """Step decay by epochs: lr * gamma ** (epoch // step_size), no warm-up."""

  def schedule(count):
    epoch = count // iters_per_epoch
    return optim.lr * optim.gamma ** (epoch // optim.step_size).astype(jnp.float32)

  return schedule


def make_optimizer(
  optim: ml_collections.ConfigDict, iters_per_epoch: int
) -> optax.GradientTransformation:
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


def empty_memory(
  model: models.ReIDResNet, config: ml_collections.ConfigDict
) -> memory_lib.MemoryState:
  """A memory of no cluster (every row padding): the state before the first clustering."""
  feature_dim = models.feature_dim(model.depth, model.width)
  return memory_lib.init_memory(np.zeros((0, feature_dim), np.float32), config.memory.min_bucket)


def create_train_state(
  model: models.ReIDResNet,
  config: ml_collections.ConfigDict,
  memory: memory_lib.MemoryState | None = None,
  *,
  tx: optax.GradientTransformation | None = None,
  load_weights: bool = True,
) -> TrainState:
  """Random or pretrained init of ``model``, the optimizer of ``config`` and ``memory``.

  Args:
    model: the flax module (``models.create_model(config.model)``).
    config: the run's config (``seed``, ``data`` image size, ``model.pretrained``, ``optim``,
      ``train.iters``).
    memory: the cluster memory (default: ``empty_memory``).
    tx: the optimizer (default: ``make_optimizer(config.optim, config.train.iters)``).
    load_weights: False skips ``model.pretrained`` (for the shapes of a checkpoint).
  """
  tx = make_optimizer(config.optim, config.train.iters) if tx is None else tx
  memory = empty_memory(model, config) if memory is None else memory
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
      config.model.pretrained, variables, depth=model.depth, ibn=model.ibn
    )
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=jax.jit(tx.init)(params),
    memory=memory,
    rng=aug_key,
    apply_fn=model.apply,
    tx=tx,
  )


def checkpoint_tree(state: TrainState, generation: Generation) -> dict[str, Any]:
  """What a checkpoint holds: the state's saved fields, the pseudo labels and the
  clustering centroids of ``generation`` (one zero row when it has none: a stored array
  needs a row)."""
  centroids = generation.centroids
  if not centroids.shape[0]:
    centroids = np.zeros((1, centroids.shape[1]), np.float32)
  return {
    "train_state": {name: getattr(state, name) for name in SAVED_FIELDS},
    "pseudo_labels": generation.labels.astype(np.int32),
    "cluster_centroids": centroids.astype(np.float32),
  }


def abstract_checkpoint(
  model: models.ReIDResNet,
  config: ml_collections.ConfigDict,
  meta: dict[str, Any],
  sharding: NamedSharding,
) -> PyTree:
  """The array tree a checkpoint with this ``meta`` holds, as shapes placed by ``sharding``."""
  feature_dim = models.feature_dim(model.depth, model.width)
  bucket = int(meta["memory_bucket"])
  memory = memory_lib.MemoryState(
    centroids=jnp.zeros((bucket, feature_dim), jnp.float32), valid=jnp.zeros((bucket,), bool)
  )
  state = jax.eval_shape(lambda: create_train_state(model, config, memory, load_weights=False))
  tree = {
    "train_state": {name: getattr(state, name) for name in SAVED_FIELDS},
    "pseudo_labels": jax.ShapeDtypeStruct((int(meta["num_train"]),), jnp.int32),
    "cluster_centroids": jax.ShapeDtypeStruct(
      (max(int(meta["num_clusters"]), 1), feature_dim), jnp.float32
    ),
  }
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def from_checkpoint(
  tree: dict[str, Any],
  meta: dict[str, Any],
  model: models.ReIDResNet,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, Generation]:
  """The ``TrainState`` and the clustering (``Generation``) of a restored checkpoint tree."""
  fields = dict(tree["train_state"])
  state = TrainState(
    **fields, apply_fn=model.apply, tx=make_optimizer(config.optim, config.train.iters)
  )
  num_clusters = int(meta["num_clusters"])
  threshold = meta.get("indep_threshold")
  generation = Generation(
    labels=np.asarray(tree["pseudo_labels"]).astype(np.int64),
    centroids=np.asarray(tree["cluster_centroids"])[:num_clusters],
    indep_threshold=None if threshold is None else float(threshold),
  )
  return state, generation
