"""Evaluation protocol of dataset distillation: train K fresh networks on a set, test them.

As MTT's `evaluate_synset`: SGD momentum 0.9, weight decay 5e-4, lr decayed ×0.1 at half the
epochs, minibatches of `batch_size` (256) with DSA, plain (soft) cross-entropy; report the mean ±
std test accuracy over K networks. The K networks train together under `jax.vmap` (one jitted
step for all of them), or one after another (`vectorize=False`); both give the same networks.
Steps are Python-driven jitted calls, never `lax.scan` (slow for conv nets on XLA:CPU).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.dataset_distill.experts import epoch_batches, make_indexed_train_step
from kd_jax.train_step import TrainState, make_eval_step


def make_eval_tx(lr: float, *, epochs: int, steps_per_epoch: int, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """torch-style SGD (weight decay added to the gradient) with lr ×0.1 at epoch epochs // 2."""
  if lr <= 0:
    raise ValueError(f"evaluation lr must be > 0, got {lr} (a learned lr can go negative: use "
                     "the fixed-lr evaluation)")
  schedule = optax.piecewise_constant_schedule(lr, {(epochs // 2) * steps_per_epoch: 0.1})
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum))


def train_networks(apply_fn, init_params: Callable, images, labels, *, num_nets: int, lr: float,
                   epochs: int, batch_size: int = 256, seed: int = 0,
                   augment: Callable | None = None, momentum: float = 0.9,
                   weight_decay: float = 5e-4, vectorize: bool = True):
  """Trains `num_nets` fresh networks on (images, labels); returns their params stacked `[K, ...]`.

  labels: `[S]` class ids or `[S, C]` probabilities. Network k starts from
  `init_params(fold_in(key(seed), k))` and shuffles with `default_rng([seed, k])`; the
  augmentation key of step t, `fold_in(key(seed + 1), t)`, is shared by the K networks (they
  still see different images at each step).
  """
  if num_nets < 1 or epochs < 1:
    raise ValueError(f"need num_nets >= 1 and epochs >= 1, got {num_nets}, {epochs}")
  batch_size = min(batch_size, len(images))
  tx = make_eval_tx(lr, epochs=epochs, steps_per_epoch=-(-len(images) // batch_size),
                    momentum=momentum, weight_decay=weight_decay)
  step = make_indexed_train_step(apply_fn, tx, augment)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  keys = [jax.random.fold_in(jax.random.key(seed), k) for k in range(num_nets)]
  rngs = [np.random.default_rng([seed, k]) for k in range(num_nets)]
  create = lambda key: TrainState.create(init_params(key), {}, tx)

  def plans():  # per epoch, per network: list of (indices, mask)
    return [list(epoch_batches(rng, len(images), batch_size)) for rng in rngs]

  step_key = lambda t: jax.random.fold_in(jax.random.key(seed + 1), t)
  if vectorize:
    vstep = jax.jit(jax.vmap(step, in_axes=(0, None, None, 0, 0, None)), donate_argnums=0)
    state = jax.vmap(create)(jnp.stack(keys))
    t = 0
    for _ in range(epochs):
      for batches in zip(*plans()):
        idx, mask = (np.stack(a) for a in zip(*batches))
        state = vstep(state, images, labels, idx, mask, step_key(t))
        t += 1
    return state.params
  jstep = jax.jit(step, donate_argnums=0)
  states = [create(key) for key in keys]
  for epoch in range(epochs):
    for k, batches in enumerate(plans()):
      for j, (idx, mask) in enumerate(batches):
        states[k] = jstep(states[k], images, labels, idx, mask,
                          step_key(epoch * len(batches) + j))
  return jax.tree.map(lambda *p: jnp.stack(p), *[s.params for s in states])


def networks_accuracy(apply_fn, stacked_params, images, labels, *, batch_size: int = 500
                  ) -> np.ndarray:
  """Test accuracy `[K]` of K stacked networks on (images `[N, ...]`, labels `[N]`)."""
  eval_step = jax.jit(jax.vmap(make_eval_step(apply_fn), in_axes=({"params": 0}, None)))
  correct = 0.0
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.zeros(batch_size, np.float32)
    mask[:len(x)] = 1.0
    pad = [(0, batch_size - len(x))]
    batch = {"image": np.pad(x, pad + [(0, 0)] * (x.ndim - 1)), "label": np.pad(y, pad),
             "mask": mask}
    correct = correct + eval_step({"params": stacked_params}, batch)["eval/correct"]
  return np.asarray(correct) / len(images)


def evaluate_set(apply_fn, init_params: Callable, train_images, train_labels, test_images,
                 test_labels, **train_kwargs) -> dict:
  """The protocol: train K networks (`train_networks` kwargs) and test them.

  Returns `{"mean", "std", "accuracies"}` (accuracies in [0, 1]; std as numpy's, ddof 0 like MTT).
  """
  params = train_networks(apply_fn, init_params, train_images, train_labels, **train_kwargs)
  accs = networks_accuracy(apply_fn, params, test_images, test_labels)
  return {"mean": float(accs.mean()), "std": float(accs.std()), "accuracies": accs.tolist()}
