"""The evaluation protocol of a re-ID dataset's test split, from features (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ccreid_jax.evaluation.metrics import evaluate_ranking, pairwise_distance
from ccreid_jax.evaluation.rerank import rerank

__all__ = ["evaluate_features"]


def evaluate_features(
  features: np.ndarray, dataset: Any, eval_config: Any
) -> tuple[dict[str, float], np.ndarray]:
  """``(metrics, (Q, G) distances)`` of a test split from its features.

  Args:
    features: (Q + G, D) L2-normalised features: ``dataset.query``'s rows, then
      ``dataset.gallery``'s.
    dataset: anything with ``query`` and ``gallery`` record lists (``identity``, ``camera``).
    eval_config: ``config.eval``: ``rerank`` (k-reciprocal re-ranking with ``rerank_k1``,
      ``rerank_k2``, ``rerank_lambda``).

  Returns:
    mAP / CMC (and the other figures of ``evaluate_ranking``), and the query x gallery
    distances they were computed from (re-ranked when asked).
  """
  num_query = len(dataset.query)
  if features.shape[0] != num_query + len(dataset.gallery):
    raise ValueError(
      f"{features.shape[0]} feature rows for {num_query} query and "
      f"{len(dataset.gallery)} gallery records."
    )
  query, gallery = features[:num_query], features[num_query:]
  distmat = pairwise_distance(query, gallery)
  if eval_config.rerank:
    distmat = rerank(
      distmat,
      pairwise_distance(query, query),
      pairwise_distance(gallery, gallery),
      k1=eval_config.rerank_k1,
      k2=eval_config.rerank_k2,
      lambda_value=eval_config.rerank_lambda,
    )
  metrics = evaluate_ranking(
    distmat,
    np.array([r.identity for r in dataset.query]),
    np.array([r.identity for r in dataset.gallery]),
    np.array([r.camera for r in dataset.query]),
    np.array([r.camera for r in dataset.gallery]),
  )
  return metrics, distmat
