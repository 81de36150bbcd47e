"""Small array operations shared by the model and the host/memory side (jax only, no flax).

``memory.py`` and ``extract.py`` import them from here, not from ``ccreid_jax.models``, so that
the memory and the host-side code never load the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["l2_normalize"]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by max(||x||, eps), as torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
