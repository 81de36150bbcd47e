"""Small helpers shared by the training loop and the command line."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import tqdm

from ccreid_jax.errors import storage_error

_T = TypeVar("_T")
_R = TypeVar("_R")


def progress_bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool = True):
  """A tqdm bar that stays quiet when disabled or when stderr is not a terminal."""
  disable = (not enabled) or not sys.stderr.isatty()
  return tqdm.tqdm(
    total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True
  )


def prefetch(items: Iterable[_T], load: Callable[[_T], _R], depth: int = 2) -> Iterator[_R]:
  """``load(item)`` for each item, in order, computed on one host thread ``depth`` items ahead.

  Used to read the next batch from disk and send it to the devices while the current one
  is being computed.
  """
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    queue = collections.deque(pool.submit(load, item) for item in itertools.islice(items, depth))
    while queue:
      result = queue.popleft().result()
      for item in items:
        queue.append(pool.submit(load, item))
        break
      yield result


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename, creating its folder.

  A reader never sees half a file, and a failed write leaves no temporary file behind.

  Raises:
    StorageError: the storage refused the write (full, read-only, forbidden), naming ``path``.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as exc:
    if os.path.exists(tmp):
      os.remove(tmp)
    error = storage_error(exc, path)
    if error is not None and error is not exc:
      raise error from exc
    raise


def printable(text: str) -> str:
  """``text`` for display: the bytes of a path that is not valid UTF-8 (which Python holds as
  lone surrogates, ``os.fsdecode``) shown as ``\\xNN`` instead of failing to print."""
  try:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:  # a surrogate no file system gives: shown as \udXXXX.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` as indented JSON (keys sorted) to ``path``, atomically."""
  write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def format_results_table(results: dict[str, float], title: str = "") -> str:
  """mAP / CMC as a small fixed-width table, values in percent."""
  keys = [k for k in ("mAP", "rank1", "rank5", "rank10", "mINP") if k in results]
  header = " | ".join(f"{k:>7}" for k in keys)
  values = " | ".join(f"{100 * results[k]:6.2f}%" for k in keys)
  rule = "-" * len(header)
  lines = [title] if title else []
  lines += [header, rule, values]
  return "\n".join(lines)


class Timer:
  """Accumulates wall-clock seconds per named phase."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def phase(self, name: str):
    timer = self

    class _Phase:
      def __enter__(self):
        self.start = time.perf_counter()

      def __exit__(self, *exc):
        timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

    return _Phase()


def format_history_table(records: list[dict[str, Any]]) -> str:
  """One row per evaluation in a metrics.jsonl history: initial features, then epochs."""
  rows = []
  for record in records:
    if "mAP" not in record:
      continue
    when = "initial" if record["kind"] == "initial" else f"epoch {record['epoch']}"
    rows.append((when, record))
  header = f"{'evaluated':>10} | {'mAP':>6} | {'rank1':>6} | {'rank5':>6} | {'rank10':>6}"
  lines = [header, "-" * len(header)]
  for when, r in rows:
    lines.append(
      f"{when:>10} | "
      + " | ".join(f"{100 * r[k]:6.2f}" for k in ("mAP", "rank1", "rank5", "rank10"))
    )
  return "\n".join(lines)
