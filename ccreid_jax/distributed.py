"""Multi-process (multi-host) training helpers.

One process per host, each owning its local devices; every process runs the same program
(multi-controller JAX). The train step is the same ``jax.jit`` over a 1-axis "data" mesh of
ALL global devices that single-process training uses; what changes is only how arrays enter
it:

* the train state is replicated: every process builds it from the same seed, and
  :func:`replicate` turns each process's (identical) host copy into one global array;
* each process feeds only its rows of the global batch (:func:`process_slice`), and
  :func:`global_batch_from_local` assembles the process-local rows into one global array
  sharded along "data" (``jax.make_array_from_process_local_data``);
* replicated outputs (the loss, the state) are readable on every process.

Host-side clustering in multi-host runs (the decision): every process extracts the
features of its share of the training images, :func:`allgather_features` concatenates the
shares on every process (``process_allgather``), and every process then runs the
pseudo-labelling (kNN, Jaccard distance, DBSCAN or InfoMap) itself on the full, identical
feature matrix. Why, rather than clustering on process 0 and broadcasting:

* the kNN / Jaccard / DBSCAN pipeline is deterministic given identical features (stable
  top-k ties, a fixed summation order, DBSCAN visiting points in index order), so every
  process arrives at the same labels with no further communication;
* the result's size (number of clusters, hence the memory bucket) is only known after the
  clustering; a broadcast from process 0 would first need a broadcast of the sizes, then of
  variable-size labels and centroids, and a second code path for process 0;
* the cost is the clustering CPU time on every host at once, which is idle time for the
  accelerators either way, and one all-gather of N x D float32 features (100 MB for
  N = 12,936, D = 2048).

Everything here is a no-op-compatible wrapper in a single-process run: ``process_slice``
returns the whole batch, ``global_batch_from_local`` is a sharded ``device_put`` and
``allgather_features`` returns its input.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("ccreid_jax")

# Our own variables: all three set -> an explicit jax.distributed.initialize.
ENV_COORDINATOR = "CCREID_COORDINATOR"  # host:port of process 0's coordinator service.
ENV_NUM_PROCESSES = "CCREID_NUM_PROCESSES"
ENV_PROCESS_ID = "CCREID_PROCESS_ID"

# Variables whose presence means a launcher JAX knows how to read set up the job
# (JAX's own, SLURM, Open MPI, Kubernetes / Cloud TPU multi-host).
_JAX_ENV = ("JAX_COORDINATOR_ADDRESS",)
_SLURM_ENV = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)
_OMPI_ENV = ("OMPI_MCA_orte_hnp_uri",)
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_env_present(environ: dict[str, str]) -> str | None:
  """The name of the detected launcher, or None."""
  if all(k in environ for k in _JAX_ENV):
    return "jax"
  if all(k in environ for k in _SLURM_ENV) and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if any(k in environ for k in _OMPI_ENV):
    return "ompi"
  if any(k in environ for k in _TPU_ENV):
    return "tpu"
  return None


def maybe_initialize(environ: dict[str, str] | None = None, **kwargs: Any) -> bool:
  """Calls ``jax.distributed.initialize`` when this is one process of a multi-process job.

  * ``CCREID_COORDINATOR`` / ``CCREID_NUM_PROCESSES`` / ``CCREID_PROCESS_ID`` all set: an
    explicit initialisation with those values (setting only some of them is an error);
  * otherwise, when a launcher JAX detects by itself is present (``JAX_COORDINATOR_ADDRESS``,
    a SLURM step with more than one task, Open MPI, a multi-host Cloud TPU), a plain
    ``jax.distributed.initialize()`` that lets JAX read it;
  * otherwise nothing (a single-process run).

  Must run before anything touches a JAX device. Extra ``kwargs`` go to
  ``jax.distributed.initialize`` (e.g. ``local_device_ids``, ``initialization_timeout``).
  Returns whether JAX is now running distributed; calling it twice is harmless.
  """
  environ = dict(os.environ) if environ is None else environ
  if jax.distributed.is_initialized():
    return True
  ours = [environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)]
  if any(v is not None for v in ours):
    address, num_text, pid_text = ours
    if address is None or num_text is None or pid_text is None:
      raise ValueError(
        f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} or none; "
        f"got {dict(zip((ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), ours))}"
      )
    num, pid = int(num_text), int(pid_text)
    if not 0 <= pid < num:
      raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
    logger.info(
      "jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", address, num, pid
    )
    jax.distributed.initialize(
      coordinator_address=address, num_processes=num, process_id=pid, **kwargs
    )
    return True
  launcher = _cluster_env_present(environ)
  if launcher is None:
    return False
  logger.info("jax.distributed.initialize() from the %s environment", launcher)
  jax.distributed.initialize(**kwargs)
  return True


def process_slice(
  global_batch_size: int, *, process_index: int | None = None, process_count: int | None = None
) -> slice:
  """The rows ``[start, stop)`` of a global batch that this process feeds.

  Contiguous, equal shares in process order, which is the order of a 1-axis mesh built
  from ``jax.devices()`` (devices sorted by process): process p's rows land on its own
  devices, so the batch never crosses hosts on the way in.
  """
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if global_batch_size % count:
    raise ValueError(
      f"global batch size {global_batch_size} is not a multiple of the process count {count}"
    )
  share = global_batch_size // count
  return slice(index * share, (index + 1) * share)


def _check_mesh_order(mesh: Mesh) -> None:
  """``process_slice`` assumes a process's devices form one contiguous run of the mesh."""
  owners = [d.process_index for d in mesh.devices.flat]
  runs = [p for i, p in enumerate(owners) if i == 0 or owners[i - 1] != p]
  if len(runs) != len(set(runs)) or runs != sorted(runs):
    raise ValueError(
      f"the mesh's devices must be grouped by process in process order, got owners "
      f"{owners}; build it with make_mesh() (jax.devices() order)"
    )


def global_batch_from_local(
  local_array: np.ndarray | jax.Array, mesh: Mesh, spec: PartitionSpec = PartitionSpec("data")
) -> jax.Array:
  """One global array from each process's rows (``process_slice``) of a batch.

  ``local_array`` holds this process's rows only; the global array has
  ``process_count`` times as many rows, sharded by ``spec`` over ``mesh``. In a single
  process this is ``jax.device_put(local_array, NamedSharding(mesh, spec))``.
  """
  sharding = NamedSharding(mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(local_array, sharding)
  _check_mesh_order(mesh)
  local = np.asarray(local_array)
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A pytree that is identical on every process, as global replicated arrays.

  Use it for the train state (built from the same seed on every process) before the first
  train step; in a single process it is ``jax.device_put(tree, replicated)``, which is what
  ``train_and_evaluate`` already does.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated)

  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(replicated, x.ndim):
      return x  # Already global and replicated (e.g. restored with this sharding).
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_process_local_data(replicated, host, host.shape)

  return jax.tree_util.tree_map(one, tree)


def is_primary() -> bool:
  """True on process 0, the one process that writes logs, metrics, pictures and exports."""
  return jax.process_index() == 0


def allgather_features(local_features: np.ndarray | jax.Array) -> np.ndarray:
  """(sum of n_p, D) numpy: every process's (n_p, D) features, concatenated in process order.

  Every process must pass the same number of rows (pad the last share and cut it off
  afterwards, as ``extract_features`` pads its last batch). Single process: the input.
  """
  local = np.asarray(local_features)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def process_share(
  num_items: int, *, process_index: int | None = None, process_count: int | None = None
) -> tuple[slice, int]:
  """(this process's contiguous share of ``range(num_items)``, rows per share).

  For feature extraction before clustering: every share has ``ceil(num_items / count)``
  rows (the last may be shorter and must be padded to that length before
  :func:`allgather_features`; the padding is dropped with ``[:num_items]``).
  """
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  per = -(-num_items // count)
  return slice(min(index * per, num_items), min((index + 1) * per, num_items)), per


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-axis "data" mesh over all devices (``jax.devices()`` order), or the given ones."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def local_mesh() -> Mesh:
  """A 1-axis "data" mesh over this process's devices only (for per-process extraction)."""
  return make_mesh(jax.local_devices())


def local_copy(tree: Any) -> Any:
  """This process's copy of a replicated pytree, as arrays on its first local device."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.addressable_data(0)
    return x

  return jax.tree_util.tree_map(one, tree)
