"""Evaluation protocol speed: K networks trained together vs one after another (and on a mesh).

    PYTHONPATH=. python benchmarks/eval_k_networks.py --epochs=50
    git show 35e3959:kd_jax/dataset_distill/evaluate.py > /tmp/evaluate_35e3959.py
    PYTHONPATH=. python benchmarks/eval_k_networks.py --epochs=50 \
        --baseline=/tmp/evaluate_35e3959.py   # also the vmap evaluate.py of commit 35e3959
    PYTHONPATH=. python benchmarks/eval_k_networks.py --num_nets=6 --devices=2 --epochs=50
    PYTHONPATH=. python benchmarks/eval_k_networks.py --size=32 --channels=3 --depth=3 \
        --width=128 --num_nets=2 --epochs=2

Trains K fresh ConvNets (depth 2, width 32 at 8×8 — the digits setting; --size=32 --channels=3
--depth=3 --width=128 for MTT's) on random images with DSA. Prints, side by side:
1. one training step of K networks, compiled: `jax.vmap` of the one-network step (vmap turns
   each conv into a grouped conv, `feature_group_count=K`), the one-network step K times, and
   XLA's flop count of each;
2. `kd_jax.dataset_distill.evaluate.train_networks` called `--calls` times in a row with a new
   lr each time (as a distillation run evaluates its set: learned lr, fixed lr, curve points),
   `vectorize=True` (together: the K batches in one call, then K one-network updates) and
   `vectorize=False` (one network after another, each with its own gather and DSA); with
   `--devices=N` > 1 also on a mesh `data=N` of N CPU devices (one jitted step, K / N networks
   per device); with `--baseline=FILE` also another evaluate.py's `train_networks`. Each way
   starts from empty compile caches: its first call includes compiling.
"""
import argparse
import functools
import importlib.util
import os
import platform
import time

import results_log  # benchmarks/, the script's folder; before the flags are parsed


def parse_flags():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_nets", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--images", type=int, default=100)
  parser.add_argument("--size", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--devices", type=int, default=1,
                      help="CPU devices (XLA_FLAGS, set before jax is imported)")
  parser.add_argument("--no_dsa", action="store_true")
  parser.add_argument("--calls", type=int, default=3,
                      help="train_networks calls in a row, each with a new lr (at least 2)")
  parser.add_argument("--baseline", default="",
                      help="another evaluate.py (e.g. from `git show REV:path`) to time as well")
  return parser.parse_args()


FLAGS = parse_flags()
if FLAGS.devices > 1:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={FLAGS.devices}")

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from kd_jax.data.dsa import diff_augment  # noqa: E402
from kd_jax.dataset_distill.evaluate import make_eval_tx, train_networks  # noqa: E402
from kd_jax.dataset_distill.experts import make_indexed_train_step  # noqa: E402
from kd_jax.distiller import supervised_state  # noqa: E402
from kd_jax.models import create_model, init_model, make_apply_fn  # noqa: E402
from kd_jax.sharding import make_mesh  # noqa: E402


def seconds(fn, repeat=1):
  start = time.perf_counter()
  for _ in range(repeat):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeat


def one_step(apply_fn, init_params, augment, images, labels, batch):
  """Compiled ms per step of K networks: vmap of the one-network step vs that step K times."""
  k = FLAGS.num_nets
  tx = make_eval_tx(0.01, decay_step=10**6)
  step = make_indexed_train_step(apply_fn, tx, augment)
  rng = np.random.default_rng(0)
  idx = np.stack([rng.permutation(len(images))[:batch] for _ in range(k)]).astype(np.int32)
  mask = np.ones((k, batch), np.float32)
  key = jax.random.key(1)
  states = jax.vmap(lambda r: supervised_state({"params": init_params(r)}, tx))(
      jax.random.split(jax.random.key(0), k))
  single = jax.tree.map(lambda leaf: leaf[0], states)
  ways = {"jax.vmap of the step (grouped convs)": (
              jax.jit(jax.vmap(step, in_axes=(0, None, None, 0, 0, None))),
              (states, images, labels, idx, mask, key), 1),
          f"one network's step, x{k}": (
              jax.jit(step), (single, images, labels, idx[0], mask[0], key), k)}
  print(f"one step of {k} networks (batch {batch}), compiled:")
  for name, (jitted, args, calls) in ways.items():
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan")) * calls
    ms = 1e3 * calls * seconds(lambda: compiled(*args), repeat=20)
    print(f"  {name:>40}: {ms:7.2f} ms  ({flops / 1e6:.0f} MFLOP, compile {compile_s:.1f} s)",
          flush=True)


def main():
  shape = (FLAGS.size, FLAGS.size, FLAGS.channels)
  module = create_model("convnet", num_classes=10, depth=FLAGS.depth, width=FLAGS.width)
  apply_fn = make_apply_fn(module)
  init_params = lambda key: init_model(module, key, (1, *shape))[0]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((FLAGS.images, *shape)).astype(np.float32)
  labels = (np.arange(FLAGS.images) % 10).astype(np.int32)
  augment = None if FLAGS.no_dsa else (lambda x, key: diff_augment(x, key))
  batch = min(FLAGS.batch_size, FLAGS.images)
  steps = FLAGS.epochs * -(-FLAGS.images // batch)
  print(f"jax {jax.__version__}, {platform.machine()}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores; K={FLAGS.num_nets} "
        f"ConvNet-{FLAGS.depth} width {FLAGS.width} at {shape}, {FLAGS.images} images, "
        f"{FLAGS.epochs} epochs = {steps} steps of batch {batch}, "
        f"DSA {'off' if augment is None else 'on'}; load average {os.getloadavg()[0]:.2f}")
  one_step(apply_fn, init_params, augment, jax.numpy.asarray(images), jax.numpy.asarray(labels),
           batch)

  train = {"": train_networks}
  if FLAGS.baseline:
    spec = importlib.util.spec_from_file_location("baseline_evaluate", FLAGS.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    train[f" [{os.path.basename(FLAGS.baseline)}]"] = baseline.train_networks
  ways = {}
  for suffix, fn in train.items():
    ways[f"together (vectorize=True){suffix}"] = functools.partial(fn, vectorize=True)
    ways[f"one after another (vectorize=False){suffix}"] = functools.partial(fn, vectorize=False)
  if FLAGS.devices > 1:
    ways[f"together on mesh data={FLAGS.devices}"] = functools.partial(
        train_networks, mesh=make_mesh((("data", FLAGS.devices),)))
  print(f"train_networks, {FLAGS.epochs} epochs, {FLAGS.calls} calls in a row with lr 0.01, "
        "0.02, ... (as a distillation run's evaluations): first call (with compile) / each later "
        "call / all calls:")
  later, total = {}, {}
  for name, fn in ways.items():
    run = lambda lr, fn=fn: fn(apply_fn, init_params, images, labels, num_nets=FLAGS.num_nets,
                               lr=lr, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                               augment=augment)
    jax.clear_caches()  # each way's first call compiles everything it uses
    calls = [seconds(lambda i=i: run(0.01 * (i + 1))) for i in range(FLAGS.calls)]
    later[name], total[name] = np.mean(calls[1:]), sum(calls)
    print(f"  {name:>50}: {calls[0]:6.2f} s / {later[name]:6.2f} s / {total[name]:6.2f} s "
          f"({1e3 * later[name] / steps:.1f} ms per step of {FLAGS.num_nets} networks)",
          flush=True)
  reference = "one after another (vectorize=False)"
  for name in ways:
    print(f"  over {reference}: {later[reference] / later[name]:.2f}x per later call, "
          f"{total[reference] / total[name]:.2f}x in all  {name}")
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  with results_log.recorded("Evaluating K networks on a distilled set: together vs one after "
                            "another"):
    main()
