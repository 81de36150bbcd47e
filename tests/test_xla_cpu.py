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
