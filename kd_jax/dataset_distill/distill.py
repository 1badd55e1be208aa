"""The distillation loop: match expert trajectories, update images, labels and α.

Each iteration samples an expert and a start epoch t from the window, runs N inner SGD steps
from θ*_t on synthetic minibatches and matches θ*_{t+M} (`matching.TrajectoryMatcher`). With
`segments=G > 1` it samples G (expert, start epoch) pairs and matches their mean loss; on a mesh
with a `segment` axis each device group runs one of them, and each minibatch is split over
`data`.
Images, α and learned label logits each have their own optimizer, MTT/DATM's defaults:
SGD momentum 0.5 for images (lr_img) and α (lr_lr), SGD momentum 0.9 for labels (lr_label).
"""
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def distill(trajectories: np.ndarray, apply_fn, unravel: Callable, synthetic: SyntheticSet,
            config: MatchingConfig, *, augment: Callable | None = None,
            mesh: Mesh | None = None, callback: Callable | None = None,
            log: Callable = print) -> SyntheticSet:
  """Runs `config.iterations` matching iterations and returns the distilled set.

  Args:
    trajectories: `[experts, epochs + 1, P]` (may be memory-mapped).
    apply_fn, unravel: the model and the flat-params unraveller of the experts.
    synthetic: the initial set.
    augment: `augment(images, key)` applied inside every inner step (DSA).
    mesh: from `kd_jax.sharding.make_mesh`; see `matching.TrajectoryMatcher`.
    callback: `callback(iteration, synthetic)` called before iteration 0, 1, ... and after
      the last; use it for periodic evaluation.
  """
  num_experts, num_epochs = trajectories.shape[:2]
  if config.window.max_start - 1 + config.expert_epochs > num_epochs - 1:
    raise ValueError(f"start epochs up to max_start_epoch - 1 = {config.window.max_start - 1} "
                     f"plus expert_epochs = {config.expert_epochs} exceed the experts' "
                     f"{num_epochs - 1} epochs; lower them or train longer experts")
  learn_labels = synthetic.label_kind == "logits"
  step = make_inner_step(apply_fn, unravel, label_kind=synthetic.label_kind, augment=augment)
  matcher = TrajectoryMatcher(step, mode=config.mode, learn_labels=learn_labels,
                              segments=config.segments, mesh=mesh)
  optimizers = {"images": optax.sgd(config.lr_img, momentum=0.5),
                "lr": optax.sgd(config.lr_lr, momentum=0.5)}
  if learn_labels:
    optimizers["labels"] = optax.sgd(config.lr_label, momentum=config.momentum_label)
  values = {"images": synthetic.images, "lr": jnp.asarray(synthetic.lr, synthetic.images.dtype)}
  if learn_labels:
    values["labels"] = synthetic.labels
  opt_states = {k: tx.init(values[k]) for k, tx in optimizers.items()}
  if mesh is not None:  # replicated, like the gradients the matcher returns
    values, opt_states = jax.device_put((values, opt_states), NamedSharding(mesh, PartitionSpec()))

  @jax.jit
  def update(values, grads, opt_states):
    new_values, new_states = {}, {}
    for k, tx in optimizers.items():
      updates, new_states[k] = tx.update(grads[k], opt_states[k], values[k])
      new_values[k] = optax.apply_updates(values[k], updates)
    return new_values, new_states

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  current = lambda: SyntheticSet(values["images"], values.get("labels", synthetic.labels),
                                 values["lr"], synthetic.label_kind)
  start_time = time.time()
  for it in range(config.iterations):
    if callback is not None:
      callback(it, current())
    starts, theta_start, theta_target, indices = [], [], [], []
    for _ in range(config.segments):
      expert = int(rng.integers(num_experts))
      starts.append(config.window.sample(rng, it))
      theta_start.append(trajectories[expert, starts[-1]])
      theta_target.append(trajectories[expert, starts[-1] + config.expert_epochs])
      indices.append(minibatch_plan(rng, synthetic.images.shape[0], config.batch_syn,
                                    config.syn_steps))
    stack = lambda parts: np.stack(parts) if config.segments > 1 else parts[0]
    theta_start, theta_target = jnp.asarray(stack(theta_start)), jnp.asarray(stack(theta_target))
    indices = stack(indices)
    keys = jax.random.split(jax.random.fold_in(key, it), config.segments * config.syn_steps)
    if config.segments > 1:
      keys = keys.reshape(config.segments, config.syn_steps)
    loss, grads = matcher(theta_start, theta_target, values["images"], current().labels,
                          values["lr"], indices, keys)
    loss = float(loss)
    if not np.isfinite(loss):
      raise FloatingPointError(f"matching loss is {loss} at iteration {it}; lower "
                               "distill.lr_img / distill.lr_lr")
    updated = should_update(loss, config.threshold)
    if updated:
      grads = {"images": grads.images, "lr": grads.lr, **({"labels": grads.labels}
                                                          if learn_labels else {})}
      values, opt_states = update(values, grads, opt_states)
    if it % 10 == 0 or it == config.iterations - 1:
      log(f"iter {it:5d}  loss {loss:.4f}  start {','.join(map(str, starts)):>3}  "
          f"lr {float(values['lr']):.5f}{'' if updated else '  (skipped)'}  "
          f"{time.time() - start_time:.0f}s")
  if callback is not None:
    callback(config.iterations, current())
  return current()
