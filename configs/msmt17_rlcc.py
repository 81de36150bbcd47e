"""Cluster Contrast + RLCC pseudo-label refinement on msmt17 (alpha 0.9, beta 0, pred_temp 30)."""

from configs import msmt17


def get_config():
  config = msmt17.get_config()
  config.rlcc.enabled = True
  config.rlcc.alpha = 0.9
  config.rlcc.beta = 0.0
  config.rlcc.pred_temp = 30.0
  return config
