"""Cluster Contrast + RLCC on VeRi-776: this project's combination of the two methods.

The Cluster Contrast recipe of ``veri776.py`` (its memory, loss, sampler and schedule) with
RLCC's soft targets from the consensus of consecutive clusterings (alpha 0.9, beta 0,
prediction temperature 30; docs/algorithms.md section 6). No paper reports this combination,
so there is no published figure to reproduce; the RLCC paper's own recipe, on an SpCL-style
base, is ``veri776_rlcc_official.py``.
"""

from ccreid_jax.configs import veri776


def get_config():
  config = veri776.get_config()
  config.rlcc.enabled = True
  config.rlcc.alpha = 0.9
  config.rlcc.beta = 0.0
  config.rlcc.pred_temp = 30.0
  return config
