"""A 1-block ResNet with initialised variables, for the feature-extraction and export tests."""

import jax
import ml_collections
import numpy as np

from ccreid_jax import models
from ccreid_jax.data import augment


def tiny_model_and_variables(
  height: int, width: int, *, perturb_stats: bool = True, dtype: str = "float32"
):
  """``(model, variables)`` of a depth-10, width-8 ResNet for ``height`` x ``width`` images,
  computing in ``dtype`` ("float32" or "bfloat16"; the variables are float32).

  With ``perturb_stats``, the batch norms' running statistics are drawn around their
  initial values (mean 0, variance 1), so that eval-mode normalisation does something.
  """
  config = ml_collections.ConfigDict(
    dict(
      arch="resnet", depth=10, width=8, last_stride=1, pooling="gem", bn_group_size=16, dtype=dtype
    )
  )
  model = models.create_model(config)
  init = jax.jit(lambda key, x: model.init(key, augment.test_transform(x), train=False))
  variables = init(jax.random.PRNGKey(0), np.zeros((2, height, width, 3), np.uint8))
  if not perturb_stats:
    return model, variables
  rng = np.random.default_rng(0)
  stats = jax.tree_util.tree_map(
    lambda v: (
      np.asarray(v) * rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
      + rng.uniform(-0.05, 0.05, v.shape).astype(np.float32)
    ),
    variables["batch_stats"],
  )
  return model, {"params": variables["params"], "batch_stats": stats}
