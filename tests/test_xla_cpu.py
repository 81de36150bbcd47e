"""The CPU settings (ccreid_jax/xla_cpu.py): the XLA flag is added only when safe, never over
the user's own setting; glibc's malloc options only when JAX runs on the CPU; neither when the
package is imported, both when the command line starts."""

import json
import os
import subprocess
import sys

from ccreid_jax import xla_cpu

from conftest import ROOT


def test_added_for_a_tested_jaxlib_and_kept_with_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_cpu.apply_cpu_defaults(env, jaxlib_version="0.10.2")
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {xla_cpu.FLAG}"
  assert not xla_cpu.apply_cpu_defaults(env, jaxlib_version="0.10.2")  # not added twice.
  env = {}
  assert xla_cpu.apply_cpu_defaults(env, jaxlib_version=xla_cpu.TESTED_JAXLIB[0])
  assert env["XLA_FLAGS"] == xla_cpu.FLAG


def test_not_added_when_the_user_sets_it_opts_out_or_jaxlib_is_untested():
  mine = {"XLA_FLAGS": f"--{xla_cpu.FLAG_NAME}=dot"}
  assert not xla_cpu.apply_cpu_defaults(mine, jaxlib_version="0.10.2")
  assert mine["XLA_FLAGS"] == f"--{xla_cpu.FLAG_NAME}=dot"
  out = {xla_cpu.OPT_OUT: "0"}
  assert not xla_cpu.apply_cpu_defaults(out, jaxlib_version="0.10.2") and "XLA_FLAGS" not in out
  for version in ("0.11.0", "0.10.0", "0.9.9", None):
    env = {}
    assert not xla_cpu.apply_cpu_defaults(env, jaxlib_version=version or "")
    assert "XLA_FLAGS" not in env


def _clean_env(**extra: str) -> dict:
  """This environment without the CPU settings the test run applied (conftest.py)."""
  drop = ("XLA_FLAGS", "GLIBC_TUNABLES", xla_cpu.OPT_OUT)
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _run(code: str, env: dict) -> list[str]:
  return subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.splitlines()


def test_apply_cpu_tuning_sets_it_and_jax_accepts_it():
  """In a fresh interpreter: the flag is in XLA_FLAGS and the CPU backend starts with it."""
  code = (
    "import os; from ccreid_jax import xla_cpu; xla_cpu.apply_cpu_tuning(); "
    "import jax, jax.numpy as jnp; "
    "print(os.environ.get('XLA_FLAGS', '')); print(float(jnp.ones(3).sum()))"
  )
  expected = xla_cpu.FLAG if xla_cpu._jaxlib_version() in xla_cpu.TESTED_JAXLIB else ""
  assert _run(code, _clean_env()) == [expected, "3.0"]


# Whether a 64 MiB malloc is served by mmap (glibc's default for blocks above 32 MiB) or from
# the heap (M_MMAP_MAX=0): mallinfo2's hblkhd counts the bytes in mmapped blocks.
_MALLOC_PROBE = """
import ctypes
class _Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]
_libc = ctypes.CDLL(None)
def malloc_uses_mmap():
  if not hasattr(_libc, "mallinfo2"):
    return "n/a"
  _libc.mallinfo2.restype = _Info
  _libc.malloc.restype, _libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  _libc.free.argtypes = [ctypes.c_void_p]
  before = _libc.mallinfo2().hblkhd
  block = _libc.malloc(64 << 20)
  grown = _libc.mallinfo2().hblkhd - before
  _libc.free(block)
  return grown >= 64 << 20
"""


def test_importing_the_package_changes_neither_xla_flags_nor_malloc():
  """A fresh interpreter imports ccreid_jax and every one of its modules: XLA_FLAGS stays
  unset, nothing is recorded as applied, and a large malloc is still served by mmap (glibc's
  default). The control: the command line (``python -m ccreid_jax.main``, here with the
  user's own XLA_FLAGS) applies both settings, and the probe sees the difference."""
  report = """
from ccreid_jax import xla_cpu
print(json.dumps([os.environ.get("XLA_FLAGS"), xla_cpu.APPLIED, malloc_uses_mmap()]))
"""
  imports = (
    _MALLOC_PROBE
    + """
import importlib, json, os, pkgutil
import ccreid_jax
for module in pkgutil.walk_packages(ccreid_jax.__path__, "ccreid_jax."):
  importlib.import_module(module.name)
"""
    + report
  )
  entry_point = (
    _MALLOC_PROBE
    + """
import json, os, runpy, sys
sys.argv = ["ccreid_jax.main", "--helpshort"]
try:
  runpy.run_module("ccreid_jax.main", run_name="__main__")
except SystemExit:
  pass
"""
    + report
  )
  mine = "--xla_force_host_platform_device_count=2"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code],
      env=env,
      cwd=ROOT,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for code, env in ((imports, _clean_env()), (entry_point, _clean_env(XLA_FLAGS=mine)))
  ]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.splitlines()[-1]))
  (flags, applied, mmap), (main_flags, main_applied, main_mmap) = results
  glibc = xla_cpu._glibc_mallopt() is not None and mmap != "n/a"
  assert (flags, applied) == (None, {})
  tested = xla_cpu._jaxlib_version() in xla_cpu.TESTED_JAXLIB
  assert main_flags == (f"{mine} {xla_cpu.FLAG}" if tested else mine)
  assert main_applied == {"xla_flag": tested, "keep_freed_memory": glibc}
  if glibc:
    assert (mmap, main_mmap) == (True, False)


class _Mallopt:
  """Records glibc mallopt calls; returns ``result`` (1 = accepted)."""

  def __init__(self, result=1):
    self.calls, self.result = [], result

  def __call__(self, param, value):
    self.calls.append((param, value))
    return self.result


def test_keep_freed_memory_sets_the_three_glibc_options_when_jax_runs_on_cpu():
  for env, installed in (
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cpu,cuda"}, True),
    ({}, False),
  ):
    mallopt = _Mallopt()
    assert xla_cpu.keep_freed_memory(env, mallopt, accelerator_installed=installed)
    assert mallopt.calls == [(-8, 1), (-4, 0), (-1, -1)]  # ARENA_MAX, MMAP_MAX, TRIM_THRESHOLD.
  rejected = _Mallopt(result=0)  # glibc refused a value: reported, not hidden.
  assert not xla_cpu.keep_freed_memory({}, rejected, accelerator_installed=False)
  assert len(rejected.calls) == 3


def test_keep_freed_memory_leaves_malloc_alone_off_cpu_or_when_opted_out():
  cases = (
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"JAX_PLATFORMS": "tpu,cpu"}, False),
    ({}, True),
    ({xla_cpu.OPT_OUT: "0", "JAX_PLATFORMS": "cpu"}, False),
  )
  for env, installed in cases:
    mallopt = _Mallopt()
    assert not xla_cpu.keep_freed_memory(env, mallopt, accelerator_installed=installed)
    assert mallopt.calls == []
  assert xla_cpu.runs_on_cpu({"JAX_PLATFORMS": " CPU "}, accelerator_installed=True)
  assert not xla_cpu.runs_on_cpu({}, accelerator_installed=True)


def test_an_installed_gpu_or_tpu_plugin_counts_as_not_cpu(monkeypatch):
  """JAX finds plugins by entry point (group "jax_plugins") or module; either one counts."""
  monkeypatch.setattr(xla_cpu.metadata, "entry_points", lambda group: ["xla_cuda12"])
  monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
  assert xla_cpu._accelerator_plugin_installed() and not xla_cpu.runs_on_cpu({})
  monkeypatch.setattr(xla_cpu.metadata, "entry_points", lambda group: [])
  assert not xla_cpu._accelerator_plugin_installed() and xla_cpu.runs_on_cpu({})
  monkeypatch.setattr(
    xla_cpu.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None
  )
  assert xla_cpu._accelerator_plugin_installed() and not xla_cpu.runs_on_cpu({})
  assert xla_cpu.runs_on_cpu({"JAX_PLATFORMS": "cpu"})  # an explicit choice wins.
