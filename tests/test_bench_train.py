"""scripts/bench_train.py: the paired JAX / PyTorch rounds (timing logic only, fake clock)."""

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench_train():
  return load_script("bench_train")


def test_paired_rounds_alternate_the_order_and_pair_each_round(bench_train, monkeypatch):
  clock = [0.0]
  calls = []
  # JAX steps take 2 s in round 0 and 3 s later; PyTorch steps take 1 s, then 4 s.
  durations = {"jax": [2.0] * 2 + [3.0] * 4, "torch": [1.0] * 2 + [4.0] * 4}

  def stepper(name):
    def step():
      calls.append(name)
      clock[0] += durations[name].pop(0)

    return step

  monkeypatch.setattr(bench_train.time, "perf_counter", lambda: clock[0])
  paired = bench_train.paired_rounds(
    {"jax": stepper("jax"), "torch": stepper("torch")}, rounds=3, steps=2
  )
  assert (
    calls == ["jax"] * 2 + ["torch"] * 2 + ["torch"] * 2 + ["jax"] * 2 + ["jax"] * 2 + ["torch"] * 2
  )
  assert paired["jax_s_per_step"] == [2.0, 3.0, 3.0]
  assert paired["torch_s_per_step"] == [1.0, 4.0, 4.0]
  assert paired["jax_over_torch"] == [2.0, 0.75, 0.75]
  assert paired["median_jax_over_torch"] == 0.75
  assert paired["rounds_jax_faster"] == 2


def test_rounds_without_torch_is_refused(bench_train):
  with pytest.raises(SystemExit, match="needs --torch"):
    bench_train.main(["--rounds", "2", "--steps", "1"])
