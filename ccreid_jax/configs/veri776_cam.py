"""Camera-aware Cluster Contrast on VeRi-776: CA-Jaccard pseudo labels.

Reproduces: 43.1 mAP, Cluster Contrast with the CA-Jaccard distance (docs/algorithms.md
sections 8 and 9): the settings of ``market1501_cam.py`` with DBSCAN eps 0.6, on
``veri776.py``.
"""

from ccreid_jax.configs import variants, veri776


def get_config():
  return variants.ca_jaccard(veri776.get_config())  # DBSCAN eps: the default 0.6.
