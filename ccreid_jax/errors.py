"""The errors every layer may raise, defined below all of them.

``ConfigError``: ``validation`` raises it for the fields of a config, ``data.loading`` for a
dataset a config names that cannot be read as configured; the command line prints its lines
and exits 2. ``StorageError``: a write that the storage refused (a full disk, a read-only or
forbidden folder), raised by ``utils.write_atomic`` and the checkpoint saves; the command line
prints its one line and exits 1.
"""

from __future__ import annotations

import errno
import os

__all__ = ["STORAGE_ERRNOS", "ConfigError", "StorageError", "check_writable", "storage_error"]

# The errors of a write that the storage refuses, rather than of what is written.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
FREE_SPACE = "Free some space there (or make the folder writable), then run the command again."


class ConfigError(ValueError):
  """The config cannot run; the message lists every problem, one line each."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    count = len(self.problems)
    header = f"Invalid config ({count} problem{'s' if count != 1 else ''}):"
    super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))


class StorageError(OSError):
  """A write that the storage refused; the message is one line: the path, the cause, the fix."""

  def __init__(self, message: str, code: int | None = None, path: str | None = None):
    super().__init__(message)
    self.message = message
    self.errno, self.filename = code, path

  def __str__(self) -> str:
    return self.message


def _storage_cause(exc: BaseException) -> OSError | None:
  """``exc``, or an exception it was raised from, that is an ``OSError`` of ``STORAGE_ERRNOS``."""
  seen: set[int] = set()
  current: BaseException | None = exc
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
      return current
    current = current.__cause__ or current.__context__
  return None


def storage_error(
  exc: BaseException, path: str, what: str = "", advice: str = FREE_SPACE
) -> StorageError | None:
  """The ``StorageError`` for ``exc`` at a write of ``path`` (``what``: a description), or
  None when ``exc`` is not a write the storage refused (then re-raise ``exc`` itself)."""
  if isinstance(exc, StorageError):
    return exc
  cause = _storage_cause(exc)
  if cause is None:
    return None
  name = f"{what} {path}" if what else str(path)
  errno_value = int(cause.errno or 0)  # _storage_cause returns only errors with an errno
  return StorageError(
    f"cannot write {name}: {os.strerror(errno_value)}. {advice}", errno_value, path
  )


def check_writable(folder: str, what: str) -> None:
  """Creates ``folder`` if needed and writes (then removes) a probe file in it.

  Raises:
    StorageError: ``folder`` cannot be created or written (read-only, forbidden, full).
  """
  probe = os.path.join(folder, f".ccreid-write-test-{os.getpid()}")
  try:
    os.makedirs(folder, exist_ok=True)
    with open(probe, "w") as f:
      f.write("x")
    os.remove(probe)
  except OSError as exc:
    error = storage_error(
      exc, folder, what, advice="Make it writable (or free some space), or choose another folder."
    )
    if error is None:
      raise
    raise error from None
