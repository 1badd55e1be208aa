"""The one outer loop of dataset distillation: any `method.Method`, resumable and logged.

`distill(method, context, recording)` runs `method.prepare`, `method.start`, then
`method.iterations` iterations; each asks the method for `value_and_grad` of its objective
with respect to the synthetic values and applies each value's own optimizer. It records itself
like a training stage (`kd_jax.trainer`): it checkpoints the values, their optimizer states,
the method state and the iteration, and writes `distill/loss`, `distill/updated` and the
method's metrics (`distill/<name>`) at step i + 1 after iteration i. The method draws iteration
i's randomness from (seed, i) only, so a resumed run ends with the set of an uninterrupted one.
"""
import contextlib
import dataclasses
import os
from typing import Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kd_jax import checkpoint, metrics
from kd_jax.dataset_distill.method import Context, DistilledSet, Method


@dataclasses.dataclass(frozen=True)
class Recording:
  """Where and how often the loop records: `directory/` holds `checkpoints/`, `metrics.jsonl`
  and `tensorboard/`.

  `metadata` is saved with every checkpoint and compared on resume: it names what fixes the
  state's shapes (method, model, num_classes, image_shape, ipc, label_kind), so a resume into
  another config is refused.
  """
  directory: str
  metadata: dict
  checkpoint_every: int = 25     # iterations; the last one is always saved
  keep_checkpoints: int = 3
  tensorboard: bool = True


def _check_start(method: Method, values: dict, optimizers: dict) -> None:
  if set(optimizers) - set(values):
    raise ValueError(f"method {method.name!r}: optimizers for {sorted(set(optimizers) - set(values))} "
                     f"but its values are {sorted(values)}")
  if method.iterations < 0:
    raise ValueError(f"method {method.name!r}: iterations must be >= 0, got {method.iterations}")
  if method.iterations and not optimizers:
    raise ValueError(f"method {method.name!r} runs {method.iterations} iterations but learns "
                     "nothing (no optimizers); set its iterations to 0")


def distill(method: Method, context: Context, recording: Recording, *,
            callback: Callable | None = None) -> DistilledSet:
  """Runs `method` up to `method.iterations`, resuming from the latest checkpoint in
  `recording.directory`, and returns `method.distilled(final values)`.

  Args:
    method: any `kd_jax.dataset_distill.method.Method`.
    context: the data, networks and seed it reads.
    recording: checkpoint and metrics directory, metadata and cadence.
    callback: `callback(i, values) -> metrics dict or None`, called with the values after i
      iterations: i = 0 on a fresh start, then after every iteration run. Its metrics are
      written with step i's; use it for periodic evaluation.
  Raises:
    metrics.NonFiniteLossError: the loss became NaN/Inf; the message names the iteration and
      the last checkpoint kept.
  """
  os.makedirs(recording.directory, exist_ok=True)  # callbacks write beside the loop's files
  method.prepare(context)
  start = method.start(context)
  optimizers = start.optimizers
  _check_start(method, start.values, optimizers)
  replicated = NamedSharding(context.mesh, PartitionSpec()) if context.mesh is not None else None

  def state(iteration, values, opt_states, method_state):
    """What a checkpoint holds; replicated on a mesh."""
    return jax.device_put({"iteration": np.int32(iteration), "values": values,
                           "opt_states": opt_states, "method_state": method_state}, replicated)

  initial = state(0, start.values, {k: tx.init(start.values[k]) for k, tx in optimizers.items()},
                  start.state)

  @jax.jit
  def update(values, grads, opt_states):
    new_values, new_states = dict(values), {}
    for k, tx in optimizers.items():
      updates, new_states[k] = tx.update(grads[k], opt_states[k], values[k])
      new_values[k] = optax.apply_updates(values[k], updates)
    return new_values, new_states

  observe = lambda i, values: (callback(i, values) if callback is not None else None) or {}
  if method.iterations == 0:  # a selection method: start holds the set
    observe(0, start.values)
    return method.distilled(start.values)
  with contextlib.ExitStack() as stack:
    ckpt = checkpoint.Checkpointer(os.path.join(recording.directory, "checkpoints"),
                                   recording.metadata, keep=recording.keep_checkpoints)
    stack.callback(ckpt.close)
    restored, _ = ckpt.restore_latest(initial)  # skips (and moves aside) corrupt steps
    restored = initial if restored is None else restored
    begin, values, opt_states, method_state = (
        int(restored["iteration"]), restored["values"], restored["opt_states"],
        restored["method_state"])
    writer = metrics.MetricWriter(recording.directory, tensorboard=recording.tensorboard,
                                  enabled=jax.process_index() == 0, start_step=begin)
    stack.callback(writer.close)
    bar = metrics.progress_bar(method.iterations, begin, f"distill ({method.name})")
    stack.callback(bar.close)
    last_saved = begin if begin else None
    initial_metrics = observe(0, values) if begin == 0 else {}
    if initial_metrics:
      writer.write(0, initial_metrics)
    for it in range(begin, method.iterations):
      step = method.value_and_grad(values, method_state, it)
      loss = float(step.loss)
      if not np.isfinite(loss):
        ckpt.wait()
        kept = (f"the last good checkpoint (iteration {last_saved}) is kept in {ckpt.directory}"
                if last_saved is not None else "no checkpoint had been written yet")
        raise metrics.NonFiniteLossError(
            f"{method.name}: the distillation loss became {loss} at iteration {it}; stopping. "
            f"{kept}. Lower the learning rates of {sorted(optimizers)}.")
      if step.grads is not None:
        values, opt_states = update(values, {k: step.grads[k] for k in optimizers}, opt_states)
      method_state = step.state
      done = it + 1
      writer.write(done, {"distill/loss": loss, "distill/updated": float(step.grads is not None),
                          **{f"distill/{k}": float(v) for k, v in step.metrics.items()},
                          **observe(done, values)})
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      bar.update(1)
      if done % recording.checkpoint_every == 0 or done == method.iterations:
        ckpt.save(done, state(done, values, opt_states, method_state))
        last_saved = done
  return method.distilled(values)
