"""The host-side prefetcher shared by training and feature extraction."""

import threading

from ccreid_jax.utils import prefetch


def test_prefetch_keeps_order_and_loads_at_most_depth_ahead():
  loaded = []
  lock = threading.Lock()

  def load(item):
    with lock:
      loaded.append(item)
    return item * 10

  results = []
  for result in prefetch(range(7), load, depth=2):
    # When result k is handed out, items up to k + 2 at most have been requested.
    with lock:
      assert max(loaded) <= result // 10 + 2
    results.append(result)
  assert results == [0, 10, 20, 30, 40, 50, 60]
  assert sorted(loaded) == list(range(7))


def test_prefetch_of_nothing_yields_nothing():
  assert list(prefetch([], lambda item: item)) == []
