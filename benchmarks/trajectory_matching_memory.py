"""Memory and time of trajectory matching: exact two-pass vs unrolled autodiff (docs/design.md, "Dataset distillation").

    PYTHONPATH=. python benchmarks/trajectory_matching_memory.py
    PYTHONPATH=. python benchmarks/trajectory_matching_memory.py --ns=5,10 --max_unrolled_n=10 --time_max_n=10
    PYTHONPATH=. python benchmarks/trajectory_matching_memory.py --imagenet --max_unrolled_n=10

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

`--imagenet` prints the memory plan for ImageNet-1K at TESLA's setting instead (compile only,
nothing runs): ConvNet-4 (width 128, instance norm) at 64×64×3, 1,000 classes, fixed soft
labels (TESLA's), batch_syn 100, DSA on, IPC 1, 10 and 50 (1,000 to 50,000 images). TESLA's
repository publishes the IPC 1 command (N = 10 synthetic steps, batch_syn 100); the plan uses
N = 10 and, to show where keeping θ matters, N = 80. For each: the exact mode keeping every θ,
every 2nd, 5th and 10th (`TrajectoryMatcher(keep_every=k)`: ⌈N/k⌉ + k stored θ), and
unrolled autodiff (up to --max_unrolled_n). Per device with one device; the images, their
gradient accumulator and the labels are inputs of both pieces, so they are in both figures.
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


def _setup(num_classes, num_images, batch_syn, n, size=32, depth=3, label_kind="logits"):
  module = create_model("convnet", num_classes=num_classes, depth=depth)
  params, _ = init_model(module, jax.random.key(0), (1, size, size, 3))
  theta, unravel = ravel_pytree(params)
  step = make_inner_step(make_apply_fn(module), unravel, label_kind=label_kind,
                         augment=lambda x, k: diff_augment(x, k))
  images = jax.ShapeDtypeStruct((num_images, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((num_images, num_classes), jnp.float32)
  if num_images * size * size <= 10**7:  # small enough to materialise (the timed runs)
    images = jax.random.normal(jax.random.key(1), images.shape)
    labels = jax.random.normal(jax.random.key(2), labels.shape)
  indices = jnp.asarray(minibatch_plan(np.random.default_rng(0), num_images, batch_syn, n))
  keys = jax.random.split(jax.random.key(3), n)
  target = theta + 0.01 * jax.random.normal(jax.random.key(4), theta.shape)
  return step, (theta, target, images, labels, jnp.float32(0.01), indices, keys)


def _bytes(compiled):
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes


def stored_thetas(n: int, keep_every: int = 1) -> int:
  """The most θ the exact mode holds at once: θ_0..θ_N, or with `keep_every=k` the kept
  θ_0, θ_k, ... plus one block's recomputed k − 1 (θ_N is dropped once the loss is taken)."""
  return n + 1 if keep_every == 1 else -(-n // keep_every) + keep_every


def exact_memory(matcher, args, n, keep_every=1):
  """Peak bytes of the exact mode at N = n: its larger per-step function plus the stored θ."""
  theta, _, images, labels, lr, indices, keys = args
  fwd = matcher.step.lower(theta, images, labels, lr, indices[0], keys[0]).compile()
  acc = {"images": images, **({"labels": labels} if matcher.learn_labels else {}), "lr": lr}
  bwd = matcher.vjp_step.lower(theta, images, labels, lr, indices[0], keys[0], theta,
                               acc).compile()
  return max(_bytes(fwd), _bytes(bwd)) + stored_thetas(n, keep_every) * theta.size * 4


def imagenet_plan(max_unrolled_n: int):
  """The ImageNet-1K memory plan (see the module docstring)."""
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; ConvNet-4 64x64, 1000 classes, "
        "batch_syn 100, DSA on, fixed soft labels; GiB per device (compile only)")
  print("| IPC | N | exact, all θ | every 2nd | every 5th | every 10th | unrolled |")
  print("|---|---|---|---|---|---|---|")
  for ipc in (1, 10, 50):
    for n in (10, 80):
      step, args = _setup(1000, 1000 * ipc, 100, n, size=64, depth=4, label_kind="probs")
      exact = TrajectoryMatcher(step, mode="exact")
      cells = [exact_memory(exact, args, n, k) / GIB for k in (1, 2, 5, 10)]
      unrolled = "not compiled"
      if n <= max_unrolled_n:
        matcher = TrajectoryMatcher(step, mode="unrolled")
        unrolled = f"{_bytes(matcher.unrolled.lower(*args).compile()) / GIB:.2f}"
      theta_gib = args[0].size * 4 / GIB
      print(f"| {ipc} | {n} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {unrolled} |"
            f"  (θ: {theta_gib * 1024:.1f} MiB each)", flush=True)


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
  parser.add_argument("--imagenet", action="store_true", help="the ImageNet-1K memory plan only")
  flags = parser.parse_args()
  if flags.imagenet:
    imagenet_plan(flags.max_unrolled_n)
    return
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
