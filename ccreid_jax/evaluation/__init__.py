"""Host-side evaluation: distances and re-ID ranking metrics (numpy only)."""

from ccreid_jax.evaluation.metrics import evaluate_ranking, pairwise_distance
from ccreid_jax.evaluation.protocol import evaluate_features
from ccreid_jax.evaluation.rerank import rerank

__all__ = ["evaluate_features", "evaluate_ranking", "pairwise_distance", "rerank"]
