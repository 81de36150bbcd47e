"""The official RLCC recipe on MSMT17: SpCL's label generator with RLCC's soft targets.

Reproduces: 27.9 mAP / 56.5 rank-1, SpCL + RLCC in the RLCC paper (Zhang et al., CVPR 2021; code
``2han9x1a0release/RLCC``, ``tools/config.yaml`` run by ``tools/main.py`` on OpenUnReID;
docs/algorithms.md sections 6, 8 and 10); the recipe of ``market1501_rlcc_official.py``
(its docstring lists it and what still differs from the reference) on MSMT17.
"""

from ccreid_jax.configs import msmt17, variants


def get_config():
  return variants.official_rlcc(msmt17.get_config())  # 400 steps per epoch: msmt17.py's.
