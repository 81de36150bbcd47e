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


def test_metrics_writer_appends_records_and_a_disabled_one_writes_nothing(tmp_path):
  import json

  from ccreid_jax.run import MetricsWriter

  MetricsWriter(str(tmp_path / "off" / "metrics.jsonl"), enabled=False).write("epoch", epoch=0)
  assert not (tmp_path / "off").exists()
  writer = MetricsWriter(str(tmp_path / "on" / "metrics.jsonl"))
  writer.write("epoch", epoch=0, loss=1.5)
  writer.write("epoch", epoch=1, loss=1.25)
  text = (tmp_path / "on" / "metrics.jsonl").read_text()
  lines = [json.loads(line) for line in text.splitlines()]
  assert [(r["kind"], r["epoch"], r["loss"]) for r in lines] == [
    ("epoch", 0, 1.5),
    ("epoch", 1, 1.25),
  ]
