"""Cluster Contrast with BMW's memory rewriting on MSMT17.

There is no published figure to reproduce: the authors' repository (``liu-xb/BMW``) holds no
MSMT17 log or result, only a commented-out command. These are the settings of
``market1501_bmw.py`` (the bidirectional rewrite, 75 epochs with the lr x0.1 at 25 and 50,
batch norm over 256 images) on ``msmt17.py`` (400 steps per epoch, DBSCAN eps 0.6); compare a
run with Cluster Contrast's 27.6 mAP of ``msmt17.py``.
"""

from ccreid_jax.configs import msmt17, variants


def get_config():
  return variants.bmw(msmt17.get_config())
