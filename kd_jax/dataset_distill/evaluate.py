"""Evaluation protocol of dataset distillation: train K fresh networks on a set, test them.

As MTT's `evaluate_synset`: SGD momentum 0.9, weight decay 5e-4, lr decayed ×0.1 at half the
epochs, minibatches of `batch_size` (256) with DSA, plain (soft) cross-entropy; report the mean ±
std test accuracy over K networks.

The K networks train together (`vectorize=True`) or one after another (`vectorize=False`, the
reference); both give the same networks. Together, each step makes the K batches in one call
(`jax.vmap` of gather and DSA, one shared DSA key) and then updates the K networks with one
compiled one-network step each. It does not `jax.vmap` the update: vmap of a conv over K kernels
becomes a grouped convolution (`feature_group_count=K`), which XLA:CPU runs 2-3× slower than K
plain convolutions (benchmarks/eval_k_networks.py). With a `mesh`, the network axis is split
over its `data` axis (`jax.shard_map` under `jax.jit`, the stacked state placed by
`NamedSharding`): each device group updates its K / n networks in one jitted step.

Steps are Python-driven jitted calls, never `lax.scan` (slow for conv nets on XLA:CPU). The lr
and its decay step are traced arguments, so evaluations that differ only in lr or epochs (the
learned lr, a fixed lr, the accuracy curve) reuse one compiled step.

Two label protocols (`PROTOCOLS`): "labels" trains on the set's own labels (hard, TESLA or
learned); "teacher" trains with teacher soft labels, the large-scale protocol of SRe2L, RDED
and TESLA on ImageNet (FKD-style relabelling): each step runs the teacher on the augmented
batch the network sees, so every (image, augmentation) pair gets its own soft label, and the
loss is `kd_jax.losses.kd` at temperature T through kd_jax's own KD step
(`kd_jax.distiller.Distiller` with one `kd` term, `kd_jax.step.make_train_step`).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax.dataset_distill.experts import epoch_batches, make_indexed_train_step
from kd_jax.sharding import DATA_AXIS
from kd_jax.dataset_distill.method import Teacher
from kd_jax.distiller import Distiller, Term, supervised, supervised_state
from kd_jax.step import make_eval_step, make_train_step

PROTOCOLS = ("labels", "teacher")

_NETS = PartitionSpec(DATA_AXIS)  # leading (network) axis split over `data`
_SHARED = PartitionSpec()


@functools.lru_cache(maxsize=None)
def label_protocol(apply_fn, teacher_apply=None, temperature: float = 4.0):
  """The evaluation networks' method: plain (soft) cross-entropy on the set's labels, or, with
  a teacher's apply function, the KD loss to the teacher's soft labels at `temperature` (the
  teacher is the frozen network named "teacher"). Cached, so equal arguments give the same
  object and reuse compiled steps."""
  if teacher_apply is None:
    return supervised(apply_fn)
  return Distiller(apply_fn, [Term("kd", hparams={"temperature": temperature})],
                   teachers={"teacher": teacher_apply})


def make_eval_tx(lr, *, decay_step, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """torch-style SGD (weight decay added to the gradient) with lr ×0.1 from step `decay_step`.

  `lr` and `decay_step` may be traced (the optimizer state does not depend on them).
  """
  schedule = lambda count: jnp.where(count >= decay_step, 0.1 * lr, lr)
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum))


@functools.partial(jax.jit, static_argnames=("init_params", "momentum", "weight_decay"))
def _init_states(keys, *, init_params, momentum, weight_decay):
  """`[K]` keys → K fresh `TrainState`s stacked `[K, ...]`."""
  tx = make_eval_tx(1.0, decay_step=0, momentum=momentum, weight_decay=weight_decay)
  return jax.vmap(lambda key: supervised_state({"params": init_params(key)}, tx))(keys)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("method", "augment", "momentum", "weight_decay"))
def _one_network_step(state, frozen, images, labels, indices, mask, key, lr, decay_step, *,
                      method, augment, momentum, weight_decay):
  """One step of one network; the teacher (`frozen`) is passed apart from the donated state."""
  tx = make_eval_tx(lr, decay_step=decay_step, momentum=momentum, weight_decay=weight_decay)
  step = make_indexed_train_step(method.student, tx, augment, method=method)
  return step(state.replace(frozen=frozen), images, labels, indices, mask, key).replace(frozen={})


@functools.partial(jax.jit, static_argnames=("augment",))
def _network_batches(images, labels, indices, key, *, augment):
  """The K batches of one step at once: lists of K `augment(images[indices[k]], key)` and K
  `labels[indices[k]]` (indices `[K, B]`). DSA draws its transforms from `key` and the batch
  size only, so each equals the batch that network alone would get."""
  x, y = images[indices], labels[indices]
  if augment is not None:
    x = jax.vmap(augment, in_axes=(0, None))(x, key)
  return list(x), list(y)


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("method", "momentum", "weight_decay"))
def _network_update(state, frozen, x, y, mask, key, lr, decay_step, *, method, momentum,
                    weight_decay):
  """`kd_jax.step.make_train_step`'s step of one network on a ready batch (`method` from
  `label_protocol`; the teacher, `frozen`, is not donated)."""
  tx = make_eval_tx(lr, decay_step=decay_step, momentum=momentum, weight_decay=weight_decay)
  step = make_train_step(method, tx)
  batch = {"image": x, "label": y, "mask": mask}
  return step(state.replace(frozen=frozen), batch, key)[0].replace(frozen={})


@functools.partial(jax.jit, donate_argnums=0,
                   static_argnames=("method", "augment", "momentum", "weight_decay", "mesh"))
def _sharded_networks_step(states, frozen, images, labels, indices, mask, key, lr, decay_step, *,
                           method, augment, momentum, weight_decay, mesh):
  """One step of K networks (states `[K, ...]`, indices and mask `[K, B]`) split over the
  mesh's `data` axis; each device group updates its K / n networks one after another."""

  def local(states, frozen, images, labels, indices, mask, key, lr, decay_step):
    xs, ys = _network_batches(images, labels, indices, key, augment=augment)
    new_states = [
        _network_update(jax.tree.map(lambda leaf: leaf[k], states), frozen, xs[k], ys[k],
                        mask[k], key, lr, decay_step, method=method, momentum=momentum,
                        weight_decay=weight_decay)
        for k in range(len(xs))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *new_states)

  return jax.shard_map(local, mesh=mesh, out_specs=_NETS, in_specs=(
      _NETS, _SHARED, _SHARED, _SHARED, _NETS, _NETS, _SHARED, _SHARED, _SHARED))(
          states, frozen, images, labels, indices, mask, key, lr, decay_step)


@functools.partial(jax.jit, static_argnames=("apply_fn", "mesh"))
def _networks_correct(stacked_params, batch, *, apply_fn, mesh):
  """Correct predictions `[K]` of K stacked networks on one batch (one network after another,
  not vmapped: see the module docstring)."""
  eval_step = make_eval_step(apply_fn)

  def correct(stacked_params, batch):
    num_nets = len(jax.tree.leaves(stacked_params)[0])
    return jnp.stack([
        eval_step({"params": jax.tree.map(lambda leaf: leaf[k], stacked_params)},
                  batch)["eval/correct"] for k in range(num_nets)])

  if mesh is not None:
    correct = jax.shard_map(correct, mesh=mesh, in_specs=(_NETS, _SHARED), out_specs=_NETS)
  return correct(stacked_params, batch)


def _check_mesh(mesh: Mesh | None, num_nets: int) -> None:
  if mesh is None:
    return
  if DATA_AXIS not in mesh.shape:
    raise ValueError(f"the evaluation mesh must have a {DATA_AXIS!r} axis to split the networks "
                     f"over, got axes {mesh.axis_names}")
  if num_nets % mesh.shape[DATA_AXIS]:
    raise ValueError(f"eval.num_nets={num_nets} networks cannot be split evenly over the mesh's "
                     f"{DATA_AXIS!r} axis of size {mesh.shape[DATA_AXIS]}; use a multiple of "
                     f"{mesh.shape[DATA_AXIS]} networks or a smaller {DATA_AXIS!r} axis")


def train_networks(apply_fn, init_params: Callable, images, labels, *, num_nets: int, lr: float,
                   epochs: int, batch_size: int = 256, seed: int = 0,
                   augment: Callable | None = None, momentum: float = 0.9,
                   weight_decay: float = 5e-4, vectorize: bool = True, mesh: Mesh | None = None,
                   teacher: Teacher | None = None, temperature: float = 4.0):
  """Trains `num_nets` fresh networks on (images, labels); returns their params stacked `[K, ...]`.

  labels: `[S]` class ids or `[S, C]` probabilities. With a `teacher` the networks learn its
  soft labels at `temperature` on each augmented batch instead (the "teacher" protocol; the
  labels are then only logged as train accuracy). Network k starts from
  `init_params(fold_in(key(seed), k))` and shuffles with `default_rng([seed, k])`; the
  augmentation key of step t, `fold_in(key(seed + 1), t)`, is shared by the K networks (they
  still see different images at each step). `mesh` (with `vectorize=True`) splits the K
  networks over its `data` axis; the params come back split the same way.
  Compiled steps are cached on (`apply_fn`, `init_params`, `augment`, shapes): pass the same
  function objects across calls to reuse them.
  """
  if num_nets < 1 or epochs < 1:
    raise ValueError(f"need num_nets >= 1 and epochs >= 1, got {num_nets}, {epochs}")
  if lr <= 0:
    raise ValueError(f"evaluation lr must be > 0, got {lr} (a learned lr can go negative: use "
                     "the fixed-lr evaluation)")
  if mesh is not None and not vectorize:
    raise ValueError("a mesh splits the networks trained together: use vectorize=True with it "
                     "(vectorize=False is the one-device reference)")
  _check_mesh(mesh, num_nets)
  batch_size = min(batch_size, len(images))
  decay_step = (epochs // 2) * -(-len(images) // batch_size)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), k) for k in range(num_nets)])
  states = _init_states(keys, init_params=init_params, momentum=momentum,
                        weight_decay=weight_decay)
  rngs = [np.random.default_rng([seed, k]) for k in range(num_nets)]

  def steps():  # per step t: (key, K indices `[B]`, K masks `[B]`)
    t = 0
    for _ in range(epochs):
      for batches in zip(*[list(epoch_batches(rng, len(images), batch_size)) for rng in rngs]):
        yield (jax.random.fold_in(jax.random.key(seed + 1), t), *zip(*batches))
        t += 1

  method = label_protocol(apply_fn, teacher and teacher.apply_fn, temperature)
  frozen = {"teacher": teacher.variables} if teacher is not None else {}
  step_args = dict(lr=lr, decay_step=decay_step, method=method, momentum=momentum,
                   weight_decay=weight_decay)
  if mesh is not None:
    states = jax.device_put(states, NamedSharding(mesh, _NETS))
    images, labels, frozen = jax.device_put((images, labels, frozen),
                                            NamedSharding(mesh, _SHARED))
    place = lambda x: jax.device_put(np.stack(x), NamedSharding(mesh, _NETS))
    for key, idx, mask in steps():
      states = _sharded_networks_step(states, frozen, images, labels, place(idx), place(mask),
                                      key, augment=augment, mesh=mesh, **step_args)
    return states.trainable["student"]
  states = [jax.tree.map(lambda leaf: leaf[k], states) for k in range(num_nets)]
  for key, idx, mask in steps():
    if vectorize:
      xs, ys = _network_batches(images, labels, np.stack(idx), key, augment=augment)
      for k in range(num_nets):
        states[k] = _network_update(states[k], frozen, xs[k], ys[k], mask[k], key, **step_args)
    else:
      for k in range(num_nets):
        states[k] = _one_network_step(states[k], frozen, images, labels, idx[k], mask[k], key,
                                      augment=augment, **step_args)
  return jax.tree.map(lambda *p: jnp.stack(p), *[s.trainable["student"] for s in states])


def networks_accuracy(apply_fn, stacked_params, images, labels, *, batch_size: int = 500,
                      mesh: Mesh | None = None) -> np.ndarray:
  """Test accuracy `[K]` of K stacked networks on (images `[N, ...]`, labels `[N]`).

  `mesh` splits the K networks over its `data` axis (as `train_networks`).
  """
  _check_mesh(mesh, len(jax.tree.leaves(stacked_params)[0]))
  if mesh is not None:
    stacked_params = jax.device_put(stacked_params, NamedSharding(mesh, _NETS))
  correct = 0.0
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.zeros(batch_size, np.float32)
    mask[:len(x)] = 1.0
    pad = [(0, batch_size - len(x))]
    batch = {"image": np.pad(x, pad + [(0, 0)] * (x.ndim - 1)), "label": np.pad(y, pad),
             "mask": mask}
    correct = correct + _networks_correct(stacked_params, batch, apply_fn=apply_fn, mesh=mesh)
  return np.asarray(correct) / len(images)


def evaluate_set(apply_fn, init_params: Callable, train_images, train_labels, test_images,
                 test_labels, *, mesh: Mesh | None = None, **train_kwargs) -> dict:
  """The protocol: train K networks (`train_networks` kwargs) and test them.

  Returns `{"mean", "std", "accuracies"}` (accuracies in [0, 1]; std as numpy's, ddof 0 like MTT).
  """
  params = train_networks(apply_fn, init_params, train_images, train_labels, mesh=mesh,
                          **train_kwargs)
  accs = networks_accuracy(apply_fn, params, test_images, test_labels, mesh=mesh)
  return {"mean": float(accs.mean()), "std": float(accs.std()), "accuracies": accs.tolist()}
