"""The XLA:CPU default flag: added only when safe, never over the user's own setting."""

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


def test_importing_the_package_sets_it_and_jax_accepts_it():
  """In a fresh interpreter: the flag is in XLA_FLAGS and the CPU backend starts with it."""
  code = ("import os, ccreid_jax, jax, jax.numpy as jnp; "
          "print(os.environ.get('XLA_FLAGS', '')); print(float(jnp.ones(3).sum()))")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  expected = xla_cpu.FLAG if xla_cpu._jaxlib_version() in xla_cpu.TESTED_JAXLIB else ""
  assert out == [expected, "3.0"]


class _Mallopt:
  """Records glibc mallopt calls; returns ``result`` (1 = accepted)."""

  def __init__(self, result=1):
    self.calls, self.result = [], result

  def __call__(self, param, value):
    self.calls.append((param, value))
    return self.result


def test_keep_freed_memory_sets_the_three_glibc_options_when_jax_runs_on_cpu():
  for env, installed in (({"JAX_PLATFORMS": "cpu"}, True), ({"JAX_PLATFORMS": "cpu,cuda"}, True),
                         ({}, False)):
    mallopt = _Mallopt()
    assert xla_cpu.keep_freed_memory(env, mallopt, accelerator_installed=installed)
    assert mallopt.calls == [(-8, 1), (-4, 0), (-1, -1)]  # ARENA_MAX, MMAP_MAX, TRIM_THRESHOLD.
  rejected = _Mallopt(result=0)  # glibc refused a value: reported, not hidden.
  assert not xla_cpu.keep_freed_memory({}, rejected, accelerator_installed=False)
  assert len(rejected.calls) == 3


def test_keep_freed_memory_leaves_malloc_alone_off_cpu_or_when_opted_out():
  cases = (({"JAX_PLATFORMS": "cuda"}, False), ({"JAX_PLATFORMS": "tpu,cpu"}, False),
           ({}, True), ({xla_cpu.OPT_OUT: "0", "JAX_PLATFORMS": "cpu"}, False))
  for env, installed in cases:
    mallopt = _Mallopt()
    assert not xla_cpu.keep_freed_memory(env, mallopt, accelerator_installed=installed)
    assert mallopt.calls == []
  assert xla_cpu.runs_on_cpu({"JAX_PLATFORMS": " CPU "}, accelerator_installed=True)
  assert not xla_cpu.runs_on_cpu({}, accelerator_installed=True)


_FAULTS = """
import resource, sys, time
import ccreid_jax, jax, jax.numpy as jnp
n = 4096  # sin(x) is a 64 MiB temporary buffer of every call (the dot's operand).
f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())
x, w = jnp.ones((n, n)), jnp.ones((n, 8))
faults = 0
for call in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  if call >= 4:  # the heap settles over the first calls (the arguments' buffers, compiling).
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  time.sleep(0.2)  # XLA frees a call's buffers on its own thread just after the result.
print(faults)
"""


def test_importing_the_package_stops_steps_from_page_faulting_their_buffers_in_again():
  """Fresh interpreters on the CPU: calls of a step with a 64 MiB temporary buffer.

  Without the setting each call maps the buffer anew (16,384 faults of 4 KiB per call);
  with it the freed block is reused: counted over calls 5-16. (Now and then a small
  allocation lands in the freed block first and the heap grows by one block; on a busy
  machine that happened up to a few times in 12 calls, hence the bound of a third.)
  """
  if not sys.platform.startswith("linux") or xla_cpu._glibc_mallopt() is None:
    import pytest
    pytest.skip("glibc's mallopt only exists on Linux with glibc")
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      huge_pages = "[always]" in f.read()
  except OSError:
    huge_pages = False
  if huge_pages:
    import pytest
    pytest.skip("transparent huge pages for every mapping: 4 KiB page faults do not count it")
  faults = {}
  for opt_out in ("1", "0"):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env.update(JAX_PLATFORMS="cpu", **{xla_cpu.OPT_OUT: opt_out})
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    faults[opt_out] = int(out.split()[-1])
  pages = 4096 * 4096 * 4 // 4096
  assert faults["0"] >= 10 * pages, faults  # the test can tell the two apart...
  assert faults["1"] <= 4 * pages, faults  # ...and the setting removes most of them.


def test_an_installed_gpu_or_tpu_plugin_counts_as_not_cpu(monkeypatch):
  """JAX finds plugins by entry point (group "jax_plugins") or module; either one counts."""
  monkeypatch.setattr(xla_cpu.metadata, "entry_points", lambda group: ["xla_cuda12"])
  monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
  assert xla_cpu._accelerator_plugin_installed() and not xla_cpu.runs_on_cpu({})
  monkeypatch.setattr(xla_cpu.metadata, "entry_points", lambda group: [])
  assert not xla_cpu._accelerator_plugin_installed() and xla_cpu.runs_on_cpu({})
  monkeypatch.setattr(xla_cpu.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert xla_cpu._accelerator_plugin_installed() and not xla_cpu.runs_on_cpu({})
  assert xla_cpu.runs_on_cpu({"JAX_PLATFORMS": "cpu"})  # an explicit choice wins.
