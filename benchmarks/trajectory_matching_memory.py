"""Memory and time of trajectory matching: exact two-pass vs unrolled autodiff (docs/design.md, "Dataset distillation").

    PYTHONPATH=. python benchmarks/trajectory_matching_memory.py
    PYTHONPATH=. python benchmarks/trajectory_matching_memory.py --ns=5,10 --max_unrolled_n=10 --time_max_n=10

ConvNet-3 (width 128, instance norm) at 32×32×3, 10 classes, 100 synthetic images (batch_syn
100), DSA on, learned soft labels. Memory is XLA's `compiled.memory_analysis()`:
  exact    = max over its two jitted per-step functions (forward step, backward VJP step) of
             temp + argument bytes, plus the stored θ_0..θ_N ((N + 1)·P·4 bytes);
  unrolled = temp + argument bytes of the single jitted value-and-grad through N steps.
Unrolled compile time and memory grow with N, so it is run only up to --max_unrolled_n; the
end-to-end gradient is timed (1 call after a warm-up) up to --time_max_n. Then the steady-state
time of one call of each exact-mode piece: the forward step and the backward step
(`TrajectoryMatcher.vjp_step`, forward-over-reverse), best of 3 calls after a warm-up.
Last, the exact mode's memory at MTT's CIFAR-100 IPC 50 setting (N = 80, 5,000 images,
batch_syn 125, 100 classes), from memory analysis only.
"""
import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill.matching import TrajectoryMatcher, make_inner_step, minibatch_plan
from kd_jax.models import create_model, init_model, make_apply_fn
import results_log  # benchmarks/, the script's folder

GIB = 2.0 ** 30


def _setup(num_classes, num_images, batch_syn, n):
  module = create_model("convnet", num_classes=num_classes)
  params, _ = init_model(module, jax.random.key(0), (1, 32, 32, 3))
  theta, unravel = ravel_pytree(params)
  step = make_inner_step(make_apply_fn(module), unravel, label_kind="logits",
                         augment=lambda x, k: diff_augment(x, k))
  images = jax.random.normal(jax.random.key(1), (num_images, 32, 32, 3))
  labels = jax.random.normal(jax.random.key(2), (num_images, num_classes))
  indices = jnp.asarray(minibatch_plan(np.random.default_rng(0), num_images, batch_syn, n))
  keys = jax.random.split(jax.random.key(3), n)
  target = theta + 0.01 * jax.random.normal(jax.random.key(4), theta.shape)
  return step, (theta, target, images, labels, jnp.float32(0.01), indices, keys)


def _bytes(compiled):
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes


def exact_memory(matcher, args, n):
  """Peak bytes of the exact mode at N = n: its larger per-step function plus θ_0..θ_N."""
  theta, _, images, labels, lr, indices, keys = args
  fwd = matcher.step.lower(theta, images, labels, lr, indices[0], keys[0]).compile()
  acc = {"images": images, "labels": labels, "lr": lr}
  bwd = matcher.vjp_step.lower(theta, images, labels, lr, indices[0], keys[0], theta,
                               acc).compile()
  return max(_bytes(fwd), _bytes(bwd)) + (n + 1) * theta.size * 4


def _time(fn, repeats=1):
  """Best wall time of `repeats` calls after a warm-up call (which compiles)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def step_times(matcher, args):
  """Seconds per steady-state call of the exact mode's forward and backward steps."""
  theta, _, images, labels, lr, indices, keys = args
  fwd = _time(lambda: matcher.step(theta, images, labels, lr, indices[0], keys[0]), repeats=3)
  acc = {"images": images, "labels": labels, "lr": lr}
  bwd = _time(lambda: matcher.vjp_step(theta, images, labels, lr, indices[0], keys[0], theta,
                                       jax.tree.map(jnp.copy, acc)), repeats=3)
  return fwd, bwd


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ns", default="5,10,20,40,80")
  parser.add_argument("--max_unrolled_n", type=int, default=20)
  parser.add_argument("--time_max_n", type=int, default=20)
  flags = parser.parse_args()
  ns = [int(v) for v in flags.ns.split(",")]
  print(f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].platform}; ConvNet-3 32x32, 100 images, batch_syn 100, DSA on")
  print(f"{'N':>3} | {'exact GiB':>9} | {'unrolled GiB':>12} | {'exact s':>8} | "
        f"{'unrolled s':>10} | {'unrolled compile s':>18}")
  step, args = _setup(10, 100, 100, max(ns))
  exact = TrajectoryMatcher(step, mode="exact", learn_labels=True)
  unrolled = TrajectoryMatcher(step, mode="unrolled", learn_labels=True)
  memory = {}
  for n in ns:
    args_n = (*args[:5], args[5][:n], args[6][:n])
    memory[n] = exact_memory(exact, args_n, n)
    mem_u = t_u = t_c = t_e = float("nan")
    if n <= flags.max_unrolled_n:
      t = time.perf_counter()
      mem_u = _bytes(unrolled.unrolled.lower(*args_n).compile())
      t_c = time.perf_counter() - t
      if n <= flags.time_max_n:
        t_u = _time(lambda: unrolled(*args_n))
    if n <= flags.time_max_n:
      t_e = _time(lambda: exact(*args_n))
    print(f"{n:>3} | {memory[n] / GIB:9.3f} | {mem_u / GIB:12.3f} | {t_e:8.2f} | {t_u:10.2f} | "
          f"{t_c:18.1f}", flush=True)
  fwd, bwd = step_times(exact, args)
  print(f"exact per call: forward step {fwd:.2f} s, backward step {bwd:.2f} s")
  if 10 in memory and 80 in memory:
    print(f"exact memory N=80 / N=10: {memory[80] / memory[10]:.3f}")
  step, args = _setup(100, 5000, 125, 80)
  mem = exact_memory(TrajectoryMatcher(step, mode="exact", learn_labels=True), args, 80)
  print(f"exact, MTT CIFAR-100 IPC50 (N=80, batch_syn 125, 5000 images, 100 classes): "
        f"{mem / GIB:.3f} GiB")


if __name__ == "__main__":
  with results_log.recorded("Trajectory matching: exact vs unrolled memory and time against N"):
    main()
