"""Cluster Contrast + RLCC on MSMT17: this project's combination of the two methods.

The Cluster Contrast recipe of ``msmt17.py`` (its memory, loss, sampler and schedule) with
RLCC's soft targets from the consensus of consecutive clusterings (alpha 0.9, beta 0,
prediction temperature 30; docs/algorithms.md section 6). No paper reports this combination,
so there is no published figure to reproduce; the RLCC paper's own recipe, on an SpCL-style
base, is ``msmt17_rlcc_official.py``.
"""

from ccreid_jax.configs import msmt17, variants


def get_config():
  return variants.rlcc(msmt17.get_config())
