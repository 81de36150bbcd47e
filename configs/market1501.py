"""Cluster Contrast on Market-1501 (published recipe: 82.1 mAP / 92.3 rank-1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "market1501"
  config.train.iters = 200
  return config
