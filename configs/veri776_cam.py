"""Camera-aware Cluster Contrast on VeRi-776: CA-Jaccard pseudo labels.

Reproduces: 43.1 mAP, Cluster Contrast with the CA-Jaccard distance (docs/algorithms.md
sections 8 and 9): the settings of ``market1501_cam.py`` with DBSCAN eps 0.6, on
``veri776.py``.
"""

from ccreid_jax.configs import market1501_cam
from ccreid_jax.configs import veri776


def get_config():
  return market1501_cam.ca_jaccard_recipe(veri776.get_config(), eps=0.6)
