"""The train step and the RLCC epoch wiring against independent calculations.

``make_train_step`` is compared, over two steps, with a step assembled here by hand: the same
augmentation, the model's forward and backward (``jax.vjp``) pulled back from a loss gradient
written in numpy, Adam with coupled L2 and the step-decay lr in numpy, and the sequential momentum
update of the memory in numpy (docs/algorithms.md sections 1 and 4). Only the augmentation and
the model come from ccreid_jax. The RLCC test recomputes, from the checkpoints a run saved, the
targets of its epochs 1 and 2 and the statistics the run logged for them (section 6).
"""

import os
import shutil

import jax
import numpy as np
import optax
import pytest

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import clustering, commands, models, train
from ccreid_jax import memory as memory_lib
from ccreid_jax import run as run_lib
from ccreid_jax import state as state_lib
from ccreid_jax.data import augment as augment_lib
from ccreid_jax.distributed import make_mesh
from ccreid_jax.feature_files import read_features

from conftest import tiny_config

# ---------------------------------------------------------------------------------------
# One train step, twice, against a hand-built one.
# ---------------------------------------------------------------------------------------

BATCH = 16
NUM_CLUSTERS = 5  # real memory rows; the memory is padded to 16
BUCKET = 16
STEPS = 2


def _step_config():
  config = tiny_config("unused")
  config.train.batch_size = BATCH
  config.model.bn_group_size = BATCH
  # One step per epoch and a decay every epoch, so that the second step uses lr * gamma; a
  # weight decay large enough that coupled L2 (in the gradient, before Adam) visibly differs
  # from no decay or from decoupled decay.
  config.train.iters = 1
  config.optim.step_size = 1
  config.optim.gamma = 0.5
  config.optim.weight_decay = 0.05
  return config


def _adam_state(opt_state) -> optax.ScaleByAdamState:
  """The Adam moments and count inside the optimizer's chained state."""

  def is_adam(node):
    return isinstance(node, optax.ScaleByAdamState)

  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(found) == 1, opt_state
  return found[0]


def _leaves64(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _assert_leaves_close(
  got: list[np.ndarray], want: list[np.ndarray], *, atol: float = 0.0, scaled: float = 0.0
) -> None:
  """Leaf by leaf: |got - want| <= atol + scaled * max|want| (``scaled``: relative to the leaf)."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=atol + scaled * float(np.abs(w).max()))


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


class _ReferenceStep:
  """The step written out: augment, forward, numpy loss and gradient, numpy Adam and memory.

  Holds its own copies of everything (float64 where numpy computes); ``step`` advances them.
  """

  def __init__(self, model, config, state: state_lib.TrainState):
    self.model, self.config = model, config
    self.rng = np.asarray(state.rng)
    self.step_count = 0
    self.treedef = jax.tree_util.tree_structure(state.params)
    self.params = _leaves64(state.params)
    self.batch_stats = jax.device_get(state.batch_stats)
    self.mu = [np.zeros_like(p) for p in self.params]
    self.nu = [np.zeros_like(p) for p in self.params]
    self.memory = np.asarray(state.memory.centroids, np.float64)
    self.num_clusters = int(np.asarray(state.memory.valid).sum())

    def forward(params, batch_stats, x):
      features, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return features, updates["batch_stats"]

    def pullback(params, batch_stats, x, cotangent):
      _, vjp = jax.vjp(lambda p: forward(p, batch_stats, x)[0], params)
      return vjp(cotangent)[0]

    # Compiled, as in the train step, so that both run the model's forward and backward as
    # one XLA program each.
    self._forward, self._pullback = jax.jit(forward), jax.jit(pullback)

  def _params32(self):
    return jax.tree_util.tree_unflatten(self.treedef, [p.astype(np.float32) for p in self.params])

  def step(self, images: np.ndarray, labels: np.ndarray) -> float:
    cfg = self.config
    aug = cfg.augment
    key = jax.random.fold_in(self.rng, self.step_count)
    x = augment_lib.train_augment(
      key, images, flip_prob=aug.flip_prob, pad=aug.pad, erasing_prob=aug.erasing_prob
    )

    params32 = self._params32()
    features, new_stats = self._forward(params32, self.batch_stats, x)
    f = np.asarray(features, np.float64)

    # Loss against the memory as it is before this step's update; padded rows left out.
    tau = cfg.memory.temperature
    memory = self.memory[: self.num_clusters]
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    fn = f / norm
    prob = _softmax(fn @ memory.T / tau)
    rows = np.arange(len(labels))
    loss = float(-np.mean(np.log(prob[rows, labels])))
    # d loss / d features through the softmax, the product with the memory and the L2 norm.
    d_logits = prob.copy()
    d_logits[rows, labels] -= 1.0
    d_logits /= len(labels)
    d_fn = d_logits @ memory / tau
    d_f = (d_fn - fn * np.sum(fn * d_fn, axis=1, keepdims=True)) / norm
    grads = self._pullback(params32, self.batch_stats, x, d_f.astype(np.float32))

    # Adam with coupled L2 (torch.optim.Adam(weight_decay=...)); lr by epoch, step decay.
    optim = cfg.optim
    epoch = self.step_count // cfg.train.iters
    lr = optim.lr * optim.gamma ** (epoch // optim.step_size)
    t = self.step_count + 1
    b1, b2, eps = 0.9, 0.999, 1e-8
    for i, g in enumerate(_leaves64(grads)):
      g = g + optim.weight_decay * self.params[i]
      self.mu[i] = b1 * self.mu[i] + (1 - b1) * g
      self.nu[i] = b2 * self.nu[i] + (1 - b2) * g * g
      m_hat = self.mu[i] / (1 - b1**t)
      v_hat = self.nu[i] / (1 - b2**t)
      self.params[i] = self.params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)

    self.update_memory(fn, labels)
    self.batch_stats = jax.device_get(new_stats)
    self.step_count += 1
    return loss

  def update_memory(self, features: np.ndarray, labels: np.ndarray) -> None:
    """After the gradient, with the step's (normalised) features: sample by sample in batch
    order, renormalised each time."""
    mom = self.config.memory.momentum
    for feature, label in zip(features, labels):
      row = mom * self.memory[label] + (1 - mom) * feature
      self.memory[label] = row / np.linalg.norm(row)


def test_train_step_equals_a_hand_built_step():
  config = _step_config()
  model = models.create_model(config.model)
  dim = models.feature_dim(config.model.depth, config.model.width)
  tx = state_lib.make_optimizer(config.optim, config.train.iters)
  rng = np.random.default_rng(7)
  centroids = rng.normal(size=(NUM_CLUSTERS, dim)).astype(np.float32)
  centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  state = state_lib.create_train_state(
    model, config, tx=tx, memory=memory_lib.init_memory(centroids, BUCKET)
  )
  reference = _ReferenceStep(model, config, state)
  step = train.make_train_step(config, make_mesh())

  for i in range(STEPS):
    images = rng.integers(
      0, 256, size=(BATCH, config.data.height, config.data.width, 3), dtype=np.uint8
    )
    # Clusters 0, 1, 3, 4 four times each in a shuffled order (2 is absent): the memory update
    # order is the batch order, and a row seen several times is updated several times.
    labels = rng.permutation(np.repeat(np.array([0, 1, 3, 4]), BATCH // 4)).astype(np.int32)
    expected_loss = reference.step(images, labels)
    state, metrics = step(state, images, labels)

    assert int(state.step) == i + 1
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    # Float32 (the step) against float64 (numpy): the measured gaps are 2.3e-7 for the
    # parameters (an update is ~lr = 3.5e-4) and 9e-6 of each moment leaf's largest entry.
    _assert_leaves_close(_leaves64(state.params), reference.params, atol=1e-6)
    adam = _adam_state(state.opt_state)
    assert int(adam.count) == i + 1
    _assert_leaves_close(_leaves64(adam.mu), reference.mu, scaled=1e-4)
    _assert_leaves_close(_leaves64(adam.nu), reference.nu, scaled=1e-4)
    _assert_leaves_close(
      _leaves64(state.batch_stats), _leaves64(reference.batch_stats), scaled=1e-5
    )
    memory = np.asarray(state.memory.centroids, np.float64)
    np.testing.assert_allclose(memory, reference.memory, rtol=0, atol=5e-6)
    # Row 2 (absent from every batch) and the padding are untouched.
    np.testing.assert_array_equal(memory[2], centroids[2])
    np.testing.assert_array_equal(memory[NUM_CLUSTERS:], 0.0)
    np.testing.assert_array_equal(np.asarray(state.memory.valid), np.arange(BUCKET) < NUM_CLUSTERS)


# ---------------------------------------------------------------------------------------
# RLCC: each epoch's targets come from the previous epoch's clustering.
# ---------------------------------------------------------------------------------------

_RLCC_INTS = ("num_clusters", "num_prev_clusters", "num_dissolved", "num_new")
_RLCC_FLOATS = ("mean_max_target", "frac_argmax_changed")


def _rlcc_stats(features, labels, prev_labels, prev_centroids, rlcc, *, use_prev_onehot):
  """The statistics the run logs for RLCC targets built from these inputs."""
  targets = clustering.soft_labels(
    features,
    labels,
    prev_labels,
    prev_centroids,
    use_prev_onehot=use_prev_onehot,
    alpha=rlcc.alpha,
    beta=rlcc.beta,
    pred_temp=rlcc.pred_temp,
  )
  return clustering.consensus_stats(
    prev_labels, labels, targets, num_prev_clusters=prev_centroids.shape[0]
  )


def _matches(stats: dict, record: dict) -> bool:
  return all(stats[k] == record[f"rlcc_{k}"] for k in _RLCC_INTS) and all(
    abs(stats[k] - record[f"rlcc_{k}"]) <= 1e-6 for k in _RLCC_FLOATS
  )


@pytest.mark.slow
def test_rlcc_targets_use_the_previous_epochs_labels_and_clustering_centroids(
  tiny_market, tmp_path, monkeypatch
):
  """Epochs 1 (P = q) and 2 (P mixes in the previous one-hot) recomputed from checkpoints.

  Checkpoint ``e`` (saved after epoch ``e - 1``) holds the model that extracts epoch ``e``'s
  features, and epoch ``e - 1``'s pseudo labels and clustering centroids; checkpoint ``e + 1``
  holds epoch ``e``'s labels. From these the logged RLCC statistics are recomputed, and shown
  to differ when the momentum-updated memory replaces the centroids or the current labels
  replace the previous ones.
  """
  config = tiny_config(tiny_market)
  config.rlcc.enabled = True
  config.rlcc.alpha = 0.5  # the previous clustering weighs more in the targets than at 0.9
  config.train.epochs = 3
  config.train.eval_every = 10  # evaluated at the end only
  config.log.tensorboard = False
  config.log.ranklist_queries = 0
  workdir = str(tmp_path / "run")
  kept = tmp_path / "kept"  # every checkpoint (the run keeps only the latest and the best)
  saved = {}
  real_save = checkpoint_lib.Checkpointer.save

  def save(self, step, state, meta):
    fields = state["train_state"]  # the TrainState's fields, as a dict or the dataclass
    memory = fields["memory"] if isinstance(fields, dict) else fields.memory
    saved[step] = jax.device_get(
      {
        "labels": state["pseudo_labels"],
        "centroids": state["cluster_centroids"],
        "memory": memory.centroids,
        "num_clusters": meta["num_clusters"],
      }
    )
    real_save(self, step, state, meta)
    self.wait_until_finished()
    shutil.copytree(os.path.join(self.directory, str(step)), kept / str(step))

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save)
  train.train_and_evaluate(config, workdir)
  records = run_lib.Run(workdir).epoch_records()
  assert [r["epoch"] for r in records] == [0, 1, 2] and sorted(saved) == [1, 2, 3]
  assert all(r["clusters"] > 0 for r in records), "a tiny epoch formed no cluster"
  assert not any(k.startswith("rlcc_") for k in records[0])  # no previous clustering yet

  for epoch in (1, 2):
    previous, current = saved[epoch], saved[epoch + 1]
    prev_centroids = previous["centroids"][: previous["num_clusters"]]
    out = str(tmp_path / f"features{epoch}.npz")
    commands.extract(config, workdir, split="train", out=out, checkpoint=str(kept / str(epoch)))
    features = read_features(out).features
    # These are the features epoch `epoch` clustered: they give its saved centroids.
    np.testing.assert_allclose(
      clustering.cluster_centroids(features, current["labels"]),
      current["centroids"][: current["num_clusters"]],
      atol=1e-6,
    )

    stats = _rlcc_stats(
      features,
      current["labels"],
      previous["labels"],
      prev_centroids,
      config.rlcc,
      use_prev_onehot=epoch >= 2,
    )
    record = records[epoch]
    assert stats["num_prev_clusters"] == previous["num_clusters"] == records[epoch - 1]["clusters"]
    for key in _RLCC_INTS:
      assert record[f"rlcc_{key}"] == stats[key], (epoch, key)
    for key in _RLCC_FLOATS:
      assert record[f"rlcc_{key}"] == pytest.approx(stats[key], rel=1e-6, abs=1e-7), (epoch, key)

    # The same statistics from the wrong inputs differ from the logged ones, so the checks
    # above tell the right wiring from these.
    memory = previous["memory"][: previous["num_clusters"]]
    assert not np.allclose(memory, prev_centroids, atol=1e-3)
    wrong = {
      "momentum-updated memory as the previous centroids": _rlcc_stats(
        features,
        current["labels"],
        previous["labels"],
        memory,
        config.rlcc,
        use_prev_onehot=epoch >= 2,
      ),
      "current labels and centroids as the previous ones": _rlcc_stats(
        features,
        current["labels"],
        current["labels"],
        current["centroids"][: current["num_clusters"]],
        config.rlcc,
        use_prev_onehot=epoch >= 2,
      ),
      "the other epoch's rule for P": _rlcc_stats(
        features,
        current["labels"],
        previous["labels"],
        prev_centroids,
        config.rlcc,
        use_prev_onehot=epoch < 2,
      ),
    }
    for name, other in wrong.items():
      assert not _matches(other, record), (epoch, name)
