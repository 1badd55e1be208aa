"""Trajectory matching on a device mesh: per-device memory and time per matched segment.

    PYTHONPATH=. python benchmarks/dd_sharding.py
    PYTHONPATH=. python benchmarks/dd_sharding.py --devices=8 --syn_steps=3

Runs on `--devices` host-platform devices (XLA's `--xla_force_host_platform_device_count`, set
here before jax is imported; on a GPU/TPU host the real devices are used instead). ConvNet-3
(width 128, instance norm) at 32×32×3, 10 classes, learned soft labels, DSA on, exact mode.
1. Per-device bytes (XLA `memory_analysis`, temp + arguments) of the exact mode's two per-step
   functions when the synthetic minibatch (`--batch_syn`) is split over a `data` axis of
   1, 2, 4, ... devices.
2. Seconds per matched segment (one exact value-and-gradient through `--syn_steps` steps, best
   of 2 after a warm-up) for: 1 segment on 1 device; `--devices` segments in one program on
   1 device; `--devices` segments on a ("segment", devices) mesh, one per device.
On a CPU host the fake devices share the same cores, so (2) shows the overhead of the sharded
program, not a speed-up; (1) holds on any backend.
"""
import argparse
import os
import platform
import sys
import time

if __name__ == "__main__":
  _devices = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "2")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices}")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from kd_jax.data.dsa import diff_augment  # noqa: E402
from kd_jax.dataset_distill.matching import (TrajectoryMatcher, make_inner_step,  # noqa: E402
                                             minibatch_plan)
from kd_jax.models import create_model, init_model, make_apply_fn  # noqa: E402
from kd_jax.sharding import make_mesh  # noqa: E402
import results_log  # noqa: E402  (benchmarks/, the script's folder)

MIB = 2.0 ** 20


def _matcher(module, unravel, mesh, segments):
  step = make_inner_step(make_apply_fn(module), unravel, label_kind="logits",
                         augment=lambda x, k: diff_augment(x, k))
  return TrajectoryMatcher(step, mode="exact", learn_labels=True, segments=segments, mesh=mesh)


def _time(fn, repeats=2):
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--batch_syn", type=int, default=128)
  parser.add_argument("--syn_steps", type=int, default=3)
  flags = parser.parse_args()
  devices = jax.devices()[:flags.devices]
  module = create_model("convnet", num_classes=10)
  params, _ = init_model(module, jax.random.key(0), (1, 32, 32, 3))
  theta, unravel = ravel_pytree(params)
  images = jax.random.normal(jax.random.key(1), (flags.images, 32, 32, 3))
  labels = jax.random.normal(jax.random.key(2), (flags.images, 10))
  lr = jnp.float32(0.01)
  print(f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{len(devices)} {devices[0].platform} devices; ConvNet-3 32x32, {flags.images} images, "
        f"batch_syn {flags.batch_syn}, N={flags.syn_steps}, DSA on, exact mode")

  print("1) per-device MiB of the exact mode's step functions, minibatch split over `data`")
  print(f"{'data':>5} | {'forward step':>12} | {'backward step':>13}")
  indices = minibatch_plan(np.random.default_rng(0), flags.images, flags.batch_syn, 1)[0]
  key = jax.random.key(3)
  acc = {"images": images, "labels": labels, "lr": lr}
  size = 1
  while size <= len(devices):
    mesh = make_mesh((("data", size),), devices[:size])
    matcher = _matcher(module, unravel, mesh, 1)
    placed = matcher._batch(indices[None], 0)
    per_device = []
    for fn, args in ((matcher.step, (theta, images, labels, lr, placed, key)),
                     (matcher.vjp_step, (theta, images, labels, lr, placed, key, theta, acc))):
      m = fn.lower(*args).compile().memory_analysis()
      per_device.append((m.temp_size_in_bytes + m.argument_size_in_bytes) / MIB)
    print(f"{size:>5} | {per_device[0]:12.1f} | {per_device[1]:13.1f}", flush=True)
    size *= 2

  print(f"2) seconds per matched segment (N={flags.syn_steps})")
  g = len(devices)
  rng = np.random.default_rng(1)
  starts = theta + 0.01 * jax.random.normal(jax.random.key(4), (g, theta.size))
  targets = starts + 0.01 * jax.random.normal(jax.random.key(5), starts.shape)
  plans = np.stack([minibatch_plan(rng, flags.images, flags.batch_syn, flags.syn_steps)
                    for _ in range(g)])
  keys = jax.random.split(jax.random.key(6), g * flags.syn_steps).reshape(g, flags.syn_steps)
  runs = {"1 segment, 1 device": (None, 1),
          f"{g} segments in one program, 1 device": (None, g),
          f"{g} segments, ('segment', {g}) mesh": (make_mesh((("segment", g),), devices), g)}
  for name, (mesh, segments) in runs.items():
    matcher = _matcher(module, unravel, mesh, segments)
    args = ((starts[0], targets[0], images, labels, lr, plans[0], keys[0]) if segments == 1 else
            (starts, targets, images, labels, lr, plans, keys))
    seconds = _time(lambda: matcher(*args))
    print(f"{name:>34}: {seconds / segments:6.2f} s per segment", flush=True)


if __name__ == "__main__":
  with results_log.recorded("Trajectory matching on a mesh: per-device memory, time per segment"):
    main()
