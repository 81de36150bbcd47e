"""Starting JAX processes on localhost for the multi-process tests (not a test module)."""

import json
import os
import socket
import subprocess
import time

import pytest

from ccreid_jax import xla_cpu

TIMEOUT_S = 420


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(local_devices: int, **extra: str) -> dict:
  """The test's environment on ``local_devices`` CPU devices, without any cluster variables."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CCREID_", "JAX_COORD"))}
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
    **extra,
  )
  xla_cpu.apply_cpu_defaults(env)  # the CPU flag the test process runs with (xla_cpu.py)
  return env


def last_json_line(stdout: str) -> dict:
  """The last line of ``stdout`` that is a JSON object. Gloo's native threads print lines
  such as "[Gloo] Rank 1 is connected to 1 peer ranks" to the same stdout, and they can
  land after the script's result."""
  lines = [line for line in stdout.splitlines() if line.startswith("{")]
  assert lines, f"no JSON result in the process's output:\n{stdout[-2000:]}"
  return json.loads(lines[-1])


def run_processes(num_processes: int, local_devices: int, script: list[str]) -> list[dict]:
  """Starts ``script`` as the processes of one job (a local coordinator when there are
  several), waits (bounded), kills any left over, returns each one's last JSON line."""
  port = free_port()
  procs = []
  try:
    for pid in range(num_processes):
      extra = {}
      if num_processes > 1:
        extra = dict(
          CCREID_COORDINATOR=f"127.0.0.1:{port}",
          CCREID_NUM_PROCESSES=str(num_processes),
          CCREID_PROCESS_ID=str(pid),
        )
      procs.append(
        subprocess.Popen(
          script,
          env=process_env(local_devices, **extra),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    for proc in procs:
      try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"a process did not finish within {TIMEOUT_S} s")
      assert proc.returncode == 0, err[-4000:]
      outputs.append(last_json_line(out))
    return outputs
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
