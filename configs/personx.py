"""Cluster Contrast on PersonX (published: 84.7 mAP / 94.4 rank-1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "personx"
  config.train.iters = 200
  return config
