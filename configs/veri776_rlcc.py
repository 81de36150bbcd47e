"""Cluster Contrast + RLCC pseudo-label refinement on veri776 (alpha 0.9, beta 0, pred_temp 30)."""

from configs import veri776


def get_config():
  config = veri776.get_config()
  config.rlcc.enabled = True
  config.rlcc.alpha = 0.9
  config.rlcc.beta = 0.0
  config.rlcc.pred_temp = 30.0
  return config
