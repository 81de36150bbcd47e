"""Cluster Contrast on MSMT17 (published: 27.6 mAP / 56.0 rank-1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "msmt17"
  config.train.iters = 400
  return config
