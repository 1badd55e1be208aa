"""The distillation loop: match expert trajectories, update images, labels and α.

Each iteration samples an expert and a start epoch t from the window, runs N inner SGD steps
from θ*_t on synthetic minibatches and matches θ*_{t+M} (`matching.TrajectoryMatcher`). With
`segments=G > 1` it samples G (expert, start epoch) pairs and matches their mean loss; on a mesh
with a `segment` axis each device group runs one of them, and each minibatch is split over
`data`.
Images, α and learned label logits each have their own optimizer, MTT/DATM's defaults:
SGD momentum 0.5 for images (lr_img) and α (lr_lr), SGD momentum 0.9 for labels (lr_label).

The loop records itself like a training stage (`kd_jax.trainer`, see `Recording`): it
checkpoints the set, α, their optimizer states and the iteration, and writes `distill/loss`,
`distill/lr`, `distill/start_epoch` (mean over segments) and `distill/updated` at step i + 1
after iteration i. Every random draw of iteration i depends on (seed, i) only
(`iteration_draws`), so a resumed run ends with the images of an uninterrupted one.
"""
import contextlib
import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax import checkpoint, metrics
from kd_jax.dataset_distill.datm import StartWindow, should_update
from kd_jax.dataset_distill.matching import TrajectoryMatcher, make_inner_step, minibatch_plan


@dataclasses.dataclass
class SyntheticSet:
  """images `[S, H, W, C]`; labels `[S]` ids, `[S, C]` probs or logits; lr the α scalar."""
  images: jax.Array
  labels: jax.Array
  lr: jax.Array
  label_kind: str


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
  """Hyperparameters of the loop (names as MTT's flags where they exist)."""
  iterations: int
  syn_steps: int                 # N
  expert_epochs: int             # M
  window: StartWindow
  batch_syn: int
  lr_img: float
  lr_lr: float
  lr_label: float = 2.0          # DATM lr_y
  momentum_label: float = 0.9    # DATM Momentum_y
  mode: str = "exact"
  threshold: float | None = None
  seed: int = 0
  segments: int = 1              # (expert, start epoch) pairs matched per iteration
  keep_every: int = 1            # exact/tesla: θ kept every k steps, the rest recomputed


@dataclasses.dataclass(frozen=True)
class Recording:
  """Where and how often the loop records: `directory/` holds `checkpoints/`, `metrics.jsonl`
  and `tensorboard/`.

  `metadata` is saved with every checkpoint and compared on resume: it names what fixes the
  state's shapes (model, num_classes, image_shape, ipc, label_kind), so a resume into another
  config is refused.
  """
  directory: str
  metadata: dict
  checkpoint_every: int = 25     # iterations; the last one is always saved
  keep_checkpoints: int = 3
  tensorboard: bool = True


def iteration_draws(trajectories: np.ndarray, config: MatchingConfig, num_synthetic: int,
                    iteration: int):
  """The random draws of `iteration`, a function of (`config.seed`, `iteration`) only.

  Host draws (experts, start epochs, minibatches) come from the iteration-th child of
  `SeedSequence(seed)`, augmentation keys from `fold_in(key(seed), iteration)`.
  Returns (start epochs, θ_start, θ_target, indices `[N, batch_syn]`, keys `[N]`), each but
  the start epochs with a leading `[G]` axis when `config.segments = G > 1`.
  """
  rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(iteration,)))
  starts, theta_start, theta_target, indices = [], [], [], []
  for _ in range(config.segments):
    expert = int(rng.integers(trajectories.shape[0]))
    starts.append(config.window.sample(rng, iteration))
    theta_start.append(trajectories[expert, starts[-1]])
    theta_target.append(trajectories[expert, starts[-1] + config.expert_epochs])
    indices.append(minibatch_plan(rng, num_synthetic, config.batch_syn, config.syn_steps))
  stack = lambda parts: np.stack(parts) if config.segments > 1 else parts[0]
  keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), iteration),
                          config.segments * config.syn_steps)
  if config.segments > 1:
    keys = keys.reshape(config.segments, config.syn_steps)
  return (starts, jnp.asarray(stack(theta_start)), jnp.asarray(stack(theta_target)),
          stack(indices), keys)


def distill(trajectories: np.ndarray, apply_fn, unravel: Callable, synthetic: SyntheticSet,
            config: MatchingConfig, recording: Recording, *, augment: Callable | None = None,
            mesh: Mesh | None = None, callback: Callable | None = None) -> SyntheticSet:
  """Runs the matching iterations up to `config.iterations`, resuming from the latest
  checkpoint in `recording.directory`, and returns the distilled set.

  Args:
    trajectories: `[experts, epochs + 1, P]` (may be memory-mapped).
    apply_fn, unravel: the model and the flat-params unraveller of the experts.
    synthetic: the initial set (also the shapes a checkpoint is restored into).
    recording: checkpoint and metrics directory, metadata and cadence.
    augment: `augment(images, key)` applied inside every inner step (DSA).
    mesh: from `kd_jax.sharding.make_mesh`; see `matching.TrajectoryMatcher`.
    callback: `callback(i, synthetic) -> metrics dict or None`, called with the set after i
      iterations: i = 0 on a fresh start, then after every iteration run. Its metrics are
      written with step i's; use it for periodic evaluation.
  Raises:
    metrics.NonFiniteLossError: the matching loss became NaN/Inf; the message names the
      iteration and the last checkpoint kept.
  """
  num_epochs = trajectories.shape[1]
  if config.window.max_start - 1 + config.expert_epochs > num_epochs - 1:
    raise ValueError(f"start epochs up to max_start_epoch - 1 = {config.window.max_start - 1} "
                     f"plus expert_epochs = {config.expert_epochs} exceed the experts' "
                     f"{num_epochs - 1} epochs; lower them or train longer experts")
  learn_labels = synthetic.label_kind == "logits"
  step = make_inner_step(apply_fn, unravel, label_kind=synthetic.label_kind, augment=augment)
  matcher = TrajectoryMatcher(step, mode=config.mode, learn_labels=learn_labels,
                              segments=config.segments, mesh=mesh, keep_every=config.keep_every)
  optimizers = {"images": optax.sgd(config.lr_img, momentum=0.5),
                "lr": optax.sgd(config.lr_lr, momentum=0.5)}
  if learn_labels:
    optimizers["labels"] = optax.sgd(config.lr_label, momentum=config.momentum_label)
  values = {"images": synthetic.images, "lr": jnp.asarray(synthetic.lr, synthetic.images.dtype)}
  if learn_labels:
    values["labels"] = synthetic.labels
  replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

  def state(iteration, values, opt_states):
    """What a checkpoint holds; replicated on a mesh, like the matcher's gradients."""
    return jax.device_put({"iteration": np.int32(iteration), "values": values,
                           "opt_states": opt_states}, replicated)

  initial = state(0, values, {k: tx.init(values[k]) for k, tx in optimizers.items()})

  @jax.jit
  def update(values, grads, opt_states):
    new_values, new_states = {}, {}
    for k, tx in optimizers.items():
      updates, new_states[k] = tx.update(grads[k], opt_states[k], values[k])
      new_values[k] = optax.apply_updates(values[k], updates)
    return new_values, new_states

  current = lambda: SyntheticSet(values["images"], values.get("labels", synthetic.labels),
                                 values["lr"], synthetic.label_kind)
  observe = lambda i: (callback(i, current()) if callback is not None else None) or {}
  with contextlib.ExitStack() as stack:
    ckpt = checkpoint.Checkpointer(os.path.join(recording.directory, "checkpoints"),
                                   recording.metadata, keep=recording.keep_checkpoints)
    stack.callback(ckpt.close)
    restored, _ = ckpt.restore_latest(initial)  # skips (and moves aside) corrupt steps
    restored = initial if restored is None else restored
    start, values, opt_states = (int(restored["iteration"]), restored["values"],
                                 restored["opt_states"])
    writer = metrics.MetricWriter(recording.directory, tensorboard=recording.tensorboard,
                                  enabled=jax.process_index() == 0, start_step=start)
    stack.callback(writer.close)
    bar = metrics.progress_bar(config.iterations, start, "distill")
    stack.callback(bar.close)
    last_saved = start if start else None
    initial_metrics = observe(0) if start == 0 else {}
    if initial_metrics:
      writer.write(0, initial_metrics)
    for it in range(start, config.iterations):
      starts, theta_start, theta_target, indices, keys = iteration_draws(
          trajectories, config, synthetic.images.shape[0], it)
      loss, grads = matcher(theta_start, theta_target, values["images"], current().labels,
                            values["lr"], indices, keys)
      loss = float(loss)
      if not np.isfinite(loss):
        ckpt.wait()
        kept = (f"the last good checkpoint (iteration {last_saved}) is kept in {ckpt.directory}"
                if last_saved is not None else "no checkpoint had been written yet")
        raise metrics.NonFiniteLossError(f"matching loss became {loss} at iteration {it}; "
                                         f"stopping. {kept}. Lower distill.lr_img / "
                                         "distill.lr_lr.")
      updated = should_update(loss, config.threshold)
      if updated:
        grads = {"images": grads.images, "lr": grads.lr, **({"labels": grads.labels}
                                                            if learn_labels else {})}
        values, opt_states = update(values, grads, opt_states)
      done = it + 1
      lr = float(values["lr"])
      writer.write(done, {"distill/loss": loss, "distill/lr": lr,
                          "distill/start_epoch": float(np.mean(starts)),
                          "distill/updated": float(updated), **observe(done)})
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.5f}", refresh=False)
      bar.update(1)
      if done % recording.checkpoint_every == 0 or done == config.iterations:
        ckpt.save(done, state(done, values, opt_states))
        last_saved = done
  return current()
