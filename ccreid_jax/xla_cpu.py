"""A faster XLA:CPU setting, applied when the package is imported (before JAX starts).

XLA:CPU (jaxlib 0.10) hands convolutions, matrix products, element-wise ops and reductions
to the YNNPACK library. On ResNet training steps its convolutions are slower than XLA's own
(Eigen) ones, while its reductions (the batch-norm statistics) are much faster. Keeping
YNNPACK for reductions only (``--xla_cpu_experimental_ynn_fusion_type=reduce``) made the
CPU train step 1.2-1.3x faster and extraction 1.1-1.4x faster on ResNet-18 and ResNet-50
(docs/benchmarks.md). GPUs and TPUs ignore ``xla_cpu_*`` flags.

The flag is added to ``XLA_FLAGS`` only when
* ``XLA_FLAGS`` does not already set it (yours wins),
* ``CCREID_XLA_CPU_DEFAULTS`` is not ``0`` (the opt-out), and
* the installed jaxlib is a version it was measured with (``TESTED_JAXLIB``): XLA aborts on
  a flag it does not know, and experimental flags come and go. Add a version here after
  checking that ``tests/test_xla_cpu.py`` passes and the CPU step is not slower with it.
It has no effect when JAX's backend was already started before ``ccreid_jax`` was imported.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import MutableMapping

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=reduce"
OPT_OUT = "CCREID_XLA_CPU_DEFAULTS"
TESTED_JAXLIB = ("0.10.2",)


def _jaxlib_version() -> str | None:
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None,
                       jaxlib_version: str | None = None) -> bool:
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
