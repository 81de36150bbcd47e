"""Faster CPU settings for a process, applied by the entry points before JAX starts.

Importing ``ccreid_jax`` (or any of its modules) changes nothing: the programs call
``apply_cpu_tuning()`` themselves, before JAX's backend starts. They are
``python -m ccreid_jax.main`` (so ``scripts/demo.sh``), the ``scripts/bench_*.py`` scripts and
the test suite (``tests/conftest.py``). Code that imports ``ccreid_jax`` as a library runs
with JAX's and glibc's defaults unless it calls ``apply_cpu_tuning()`` itself, first thing.

Two settings, each measured on the ResNet train step (docs/benchmarks.md); both are turned
off with ``CCREID_XLA_CPU_DEFAULTS=0`` in the environment of the program.

**The XLA flag.**

XLA:CPU (jaxlib 0.10) hands convolutions, matrix products, element-wise ops and reductions
to the YNNPACK library. On ResNet training steps its convolutions are slower than XLA's own
(Eigen) ones, while its reductions (the batch-norm statistics) are much faster. Keeping
YNNPACK for reductions only (``--xla_cpu_experimental_ynn_fusion_type=reduce``) makes the
CPU train step and extraction of ResNet-18 and ResNet-50 faster (see docs/benchmarks.md).
GPUs and TPUs ignore ``xla_cpu_*`` flags.

The flag is added to ``XLA_FLAGS`` only when
* ``XLA_FLAGS`` does not already set it (yours wins),
* ``CCREID_XLA_CPU_DEFAULTS`` is not ``0`` (the opt-out), and
* the installed jaxlib is a version it was measured with (``TESTED_JAXLIB``): XLA aborts on
  a flag it does not know, and experimental flags come and go. Add a version here after
  checking that ``tests/test_xla_cpu.py`` passes and the CPU step is not slower with it
  (``scripts/bench_train.py``).
It has no effect when JAX's backend was already started when ``apply_cpu_tuning`` runs.

**Reusing freed memory (glibc malloc).** Every call of a jitted CPU step allocates its
temporary buffers in one block (over a gigabyte for a ResNet-50 step at batch 16, 256x128) and
frees it at the end. glibc hands blocks that large out as fresh ``mmap`` regions, so each step
page-faults the whole block in again and unmaps it afterwards. ``keep_freed_memory`` sets
glibc's ``mallopt`` so that freed memory is kept for reuse instead: one arena
(``M_ARENA_MAX=1``; blocks of other arenas fall back to mmap whatever the settings), no mmap
(``M_MMAP_MAX=0``), no trimming (``M_TRIM_THRESHOLD=-1``). After the first call a step reuses
the block without page faults, and is faster (see docs/benchmarks.md; ``scripts/bench_train.py``
reports the page faults per step). The cost: the process keeps its peak heap for reuse instead
of returning it to the system. Applied only on Linux with glibc, and only when JAX will run on
the CPU (``JAX_PLATFORMS`` starts with ``cpu``, or is unset and no GPU/TPU plugin is
installed): it speeds up nothing on an accelerator, whose buffers live on the device. The same
effect from the shell, for any process:
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=-1``
(docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Mapping, MutableMapping
from importlib import metadata

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=reduce"
OPT_OUT = "CCREID_XLA_CPU_DEFAULTS"
TESTED_JAXLIB = ("0.10.2",)

# glibc's mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
MALLOPT_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# What ``apply_cpu_tuning`` applied in this process (empty until it runs; benchmarks record it).
APPLIED: dict[str, bool] = {}
ACCELERATOR_MODULES = (
  "jax_cuda12_plugin",
  "jax_cuda13_plugin",
  "jax_rocm60_plugin",
  "jax_rocm7_plugin",
  "libtpu",
)


def _jaxlib_version() -> str | None:
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None


def apply_cpu_defaults(
  environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None
) -> bool:
  """Adds ``FLAG`` to ``environ["XLA_FLAGS"]`` under the conditions above; True if added."""
  environ = os.environ if environ is None else environ
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT, "1") == "0" or FLAG_NAME in flags:
    return False
  if version not in TESTED_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True


def _accelerator_plugin_installed() -> bool:
  """True when JAX could find a GPU/TPU plugin (its entry points or a known plugin module)."""
  try:
    if list(metadata.entry_points(group="jax_plugins")):
      return True
  except Exception:  # a broken distribution must not break the import
    pass
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)


def runs_on_cpu(
  environ: Mapping[str, str] | None = None, accelerator_installed: bool | None = None
) -> bool:
  """Whether JAX will pick the CPU, judged without starting a backend."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if accelerator_installed is None:
    accelerator_installed = _accelerator_plugin_installed()
  return not accelerator_installed


def _glibc_mallopt() -> Callable[[int, int], int] | None:
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return None


def keep_freed_memory(
  environ: Mapping[str, str] | None = None,
  mallopt: Callable[[int, int], int] | None = None,
  accelerator_installed: bool | None = None,
) -> bool:
  """Sets ``MALLOPT_SETTINGS`` (see the module doc) when JAX runs on the CPU; True if set.

  ``mallopt`` (glibc's, found when None) and ``accelerator_installed`` are for tests.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0":
    return False
  if not runs_on_cpu(environ, accelerator_installed):
    return False
  mallopt = _glibc_mallopt() if mallopt is None else mallopt
  if mallopt is None:
    return False
  results = [mallopt(param, value) for param, value in MALLOPT_SETTINGS]
  return all(result == 1 for result in results)


def apply_cpu_tuning(environ: MutableMapping[str, str] | None = None) -> dict[str, bool]:
  """Both settings of the module doc for this process; returns (and records in ``APPLIED``)
  which ones took effect: ``{"xla_flag": ..., "keep_freed_memory": ...}``.

  For entry points, before JAX's backend starts; ``CCREID_XLA_CPU_DEFAULTS=0`` turns both off.
  """
  APPLIED.update(xla_flag=apply_cpu_defaults(environ), keep_freed_memory=keep_freed_memory(environ))
  return dict(APPLIED)
