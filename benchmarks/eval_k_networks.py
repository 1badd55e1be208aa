"""Evaluation protocol speed: K networks trained together under jax.vmap vs one after another.

    PYTHONPATH=. python benchmarks/eval_k_networks.py
    PYTHONPATH=. python benchmarks/eval_k_networks.py --num_nets=5 --epochs=100 --images=100 --size=8

Trains K fresh ConvNets (depth 2, width 32 at 8×8 — the digits setting; --size=32 --depth=3
--width=128 for MTT's) on random images with DSA, as `kd_jax.dataset_distill.evaluate`
does, and prints wall time of each way (a warm-up run first, so compile time is excluded).
"""
import argparse
import platform
import time

import jax
import numpy as np

from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill.evaluate import train_networks
from kd_jax.models import create_model, init_model, make_apply_fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_nets", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--images", type=int, default=100)
  parser.add_argument("--size", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=256)
  flags = parser.parse_args()
  shape = (flags.size, flags.size, flags.channels)
  module = create_model("convnet", num_classes=10, depth=flags.depth, width=flags.width)
  apply_fn = make_apply_fn(module)
  init_params = lambda key: init_model(module, key, (1, *shape))[0]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((flags.images, *shape)).astype(np.float32)
  labels = (np.arange(flags.images) % 10).astype(np.int32)
  augment = lambda x, key: diff_augment(x, key)
  print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].platform}; "
        f"K={flags.num_nets} ConvNet-{flags.depth} width {flags.width} at {shape}, "
        f"{flags.images} images, {flags.epochs} epochs, DSA on")
  times = {}
  for vectorize in (True, False):
    run = lambda epochs: jax.block_until_ready(train_networks(
        apply_fn, init_params, images, labels, num_nets=flags.num_nets, lr=0.01, epochs=epochs,
        batch_size=flags.batch_size, augment=augment, vectorize=vectorize))
    run(1)  # compile
    t = time.perf_counter()
    run(flags.epochs)
    times[vectorize] = time.perf_counter() - t
    print(f"{'vmap' if vectorize else 'sequential':>10}: {times[vectorize]:.2f} s", flush=True)
  print(f"speed-up of vmap: {times[False] / times[True]:.2f}x")


if __name__ == "__main__":
  main()
