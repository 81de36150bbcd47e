"""The error every layer may raise about a config, defined below all of them.

``validation`` raises it for the fields of a config, ``data.loading`` for a dataset a config
names that cannot be read as configured; the command line prints its lines and exits 2.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
  """The config cannot run; the message lists every problem, one line each."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    count = len(self.problems)
    header = f"Invalid config ({count} problem{'s' if count != 1 else ''}):"
    super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))
