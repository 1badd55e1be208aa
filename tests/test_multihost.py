"""Two processes on localhost (CPU collectives, gloo) compute what one process does: the KD
step, trajectory matching with 2 segments, an expert, and the whole distill_dataset job."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.distilled_set import load_distilled
from kd_jax.dataset_distill.experts import train_expert
from kd_jax.dataset_distill.matching import TrajectoryMatcher
from multihost_worker import (EXPERT_KWARGS, NUM_STEPS, build_matching_problem, build_problem,
                              distill_job_config, make_batch)

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240  # generous: the 2 cores of CI are shared


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_workers(*args: str) -> None:
  """Runs `multihost_worker.py PROCESS_ID 2 PORT *args` as processes 0 and 1."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each worker sets 2 devices
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(WORKER.parent.parent), env.get("PYTHONPATH", "")]))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def test_two_processes_match_single_process(tmp_path):
  out = tmp_path / "result.npz"
  _run_two_workers(str(out))
  result = np.load(out)
  assert int(result["devices"]) == 4  # 2 processes × 2 devices, one global mesh

  step, state = build_problem()
  step = jax.jit(step)
  losses = []
  for i in range(NUM_STEPS):
    state, metrics = step(state, make_batch(seed=i), jax.random.PRNGKey(0))
    losses.append(float(metrics["train/loss"]))
  np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
  for path, want in jax.tree_util.tree_flatten_with_path(state.trainable["student"])[0]:
    np.testing.assert_allclose(result[jax.tree_util.keystr(path)], want, rtol=1e-5, atol=1e-6)

  matcher_kwargs, call_args, expert_args = build_matching_problem()
  loss, grads = TrajectoryMatcher(**matcher_kwargs)(*call_args)
  np.testing.assert_allclose(result["matching_loss"], loss, rtol=1e-5)
  for name in ("images", "labels", "lr"):
    want = np.asarray(getattr(grads, name))
    np.testing.assert_allclose(result[f"matching_{name}"], want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(result["expert"], train_expert(*expert_args, **EXPERT_KWARGS),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 80 s on 2 cores: three jobs' compiles; the pieces are checked above
def test_distill_job_on_two_processes_matches_one_process(tmp_path, digits_data_dir):
  """The whole job on 2 processes × 2 devices vs one process on 8 devices, both with 2 segments
  on a `segment` axis: process 0 alone writes, and the outputs agree."""
  _run_two_workers(str(tmp_path / "two"), digits_data_dir)
  results = run_lib.run(distill_job_config(digits_data_dir), tmp_path / "one")
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  for name in ("distilled_fixed_lr", "random_real", "full_data"):
    assert 0.0 <= results[name]["mean"] <= 1.0, name
    np.testing.assert_allclose(two[name]["accuracies"], results[name]["accuracies"], atol=0.01)
  arrays, metadata = load_distilled(tmp_path / "one")
  arrays_two, _ = load_distilled(tmp_path / "two")
  assert metadata["ipc"] == 10 and arrays["images"].shape == (100, 8, 8, 1)
  assert (tmp_path / "one" / "synthetic_images.png").stat().st_size > 0
  np.testing.assert_allclose(arrays_two["images"], arrays["images"], rtol=1e-4, atol=1e-5)
  assert not list((tmp_path / "two").glob("**/*.tmp*"))  # no half-written files left
