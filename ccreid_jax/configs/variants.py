"""The changes that several recipes share, each applied to a dataset's config.

Each function changes its config in place and returns it, setting only the fields whose
values differ from ``default.py``: where a method's published setting is the default, the
docstring names it and the function leaves it alone. The recipes (one file per name) apply
them to their dataset's config, e.g. ``msmt17_infomap.py`` is ``infomap(msmt17.get_config())``.
"""

import ml_collections


def infomap(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """InfoMap clustering in place of DBSCAN, the Cluster Contrast README's InfoMap rows.

  Its settings are the defaults of ``cluster.infomap_*``: kNN 15, cosine >= 0.5, clusters of
  at most 4 images dropped, the infomap package's default seed.
  """
  config.cluster.method = "infomap"
  return config


def rlcc(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """RLCC's soft targets from the consensus of consecutive clusterings, on the config's
  Cluster Contrast recipe (docs/algorithms.md section 6).

  The paper's settings are the defaults of ``rlcc``: alpha 0.9, beta 0, prediction
  temperature 30.
  """
  config.rlcc.enabled = True
  return config


def official_rlcc(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The official RLCC recipe (SpCL's label generator and memory with RLCC's soft targets),
  but for its 400 steps per epoch, which the dataset's recipe sets where it has fewer.

  Set here: SpCL's reliability criterion with outliers and unreliable members as singleton
  classes, the memory's temperature 0.04 and momentum 0.2, batches of 64 = 16 pseudo identities x 4
  images, batch norm over 16 images, evaluation every 5 epochs. The defaults give the rest:
  DBSCAN at eps 0.58 / 0.6 / 0.62 on the Jaccard distance, RLCC's alpha 0.9, beta 0 and
  prediction temperature 30.
  """
  config.cluster.reliable = True
  config.rlcc.enabled = True
  config.rlcc.outliers_as_singletons = True
  config.memory.temperature = 0.04
  config.memory.momentum = 0.2
  config.train.batch_size = 64
  config.train.num_instances = 4
  config.train.eval_every = 5
  config.model.bn_group_size = 16
  return config


def ca_jaccard(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CA-Jaccard paper's pseudo labels (camera-aware Jaccard distance) and average
  pooling; DBSCAN's radius is the dataset recipe's (0.4 on Market-1501, the default 0.6 on
  MSMT17 and VeRi-776).

  Its k-reciprocal and query-expansion sizes are the defaults of ``cluster.ca_*``: k1 5
  (same camera) and 20 (other cameras), query expansion over 2 + 4 neighbours (3 + 3 in the
  first epoch).
  """
  config.cluster.distance = "ca_jaccard"
  config.model.pooling = "avg"
  return config


def bmw(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """BMW's memory rewriting and training schedule (docs/algorithms.md section 13), on the
  config's Cluster Contrast recipe.

  Set here: the bidirectional rewrite (``memory.update_rule = "bmw"``; its pull 0.9 and push
  0.2 with dynamic weights are the defaults of ``memory.bmw_*``), 75 epochs with the learning
  rate x0.1 at epochs 25 and 50, and batch norm over the whole 256-image batch (the authors
  train on one GPU). The rest is Cluster Contrast's: ResNet-50 with GeM, batches of 16 pseudo
  identities x 16 images, Adam 3.5e-4 with coupled L2 5e-4, temperature 0.05. What BMW's code
  does that this recipe does not (IMAGENET1K_V2 weights, a trainable neck bias, Adam created
  anew every epoch) is listed in docs/fidelity.md.
  """
  config.memory.update_rule = "bmw"
  config.train.epochs = 75
  config.optim.step_size = 25
  config.model.bn_group_size = 256
  return config
