"""Cluster Contrast on VeRi-776 (published: 40.3 mAP / 84.6 rank-1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "veri776"
  config.data.height = 224
  config.data.width = 224
  config.train.iters = 400
  return config
