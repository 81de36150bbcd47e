"""Cluster Contrast on DukeMTMC-reID (published: 72.6 mAP / 84.9 rank-1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "dukemtmcreid"
  config.train.iters = 200
  return config
