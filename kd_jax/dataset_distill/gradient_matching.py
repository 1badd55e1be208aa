"""Gradient matching: DC (Zhao, Mopuri & Bilen, ICLR 2021) with DSA (Zhao & Bilen, ICML 2021).

Reference: VICO-UoE/DatasetCondensation `main.py` (the loops) and `utils.py` (`match_loss`,
`distance_wb` with dis_metric 'ours', `get_loops`, `epoch`, `DiffAugment`).

One image update, at network parameters θ, minimises

  L(X) = Σ_c D(∇_θ ℓ(θ; A_c(X_c), c), ∇_θ ℓ(θ; A_c(R_c), c)),

X_c the `ipc` synthetic images of class c, R_c a real batch of class c (`batch_real` drawn
without replacement, all of the class when it has fewer), ℓ the mean cross-entropy with hard
labels, A_c one DSA transform shared by every image of both batches (`dsa.same_transform`, the
reference's Siamese seed; a fresh one per class), and

  D(G_s, G_r) = Σ_layers Σ_out (1 − ⟨g_r, g_s⟩ / (‖g_r‖·‖g_s‖ + 1e-6))

(`distance_wb`): each weight gradient is viewed as rows, one per output unit (PyTorch's
`[out, in·h·w]`; Flax conv kernels are HWIO and dense kernels `[in, out]`, so the output axis is
the last one); rank-1 tensors (biases, norm scales) contribute 0.

DC's loops map onto the protocol as: one protocol iteration = one image update = one DC
outer step, so `iterations = dc_iterations · outer_loop` (`get_loops(ipc)`). At iteration i with
i % outer_loop == 0 the network is fresh; otherwise the carried network first trains
`inner_loop` epochs on the current synthetic set (SGD lr_net, minibatches of `batch_train`,
DSA with per-image parameters, hard labels): the reference's "update network" after the image
update, moved to the start of the next iteration. The reference skips it after the last outer
step, as here (the next iteration starts a fresh network).

Randomness of iteration i: `net_key, train_key, aug_key = split(iteration_key(seed, i), 3)`
(fresh network `init_params(net_key)`, class c's shared DSA key `fold_in(aug_key, c)`), and
from `iteration_rng(seed, i)` the training permutations, then the real batches.

Departures: the reference default init is 'noise'; here "real" (its README's DSA command,
`--init real`). The network sees `train=True` as under the reference's `net.train()`; the
network must be stateless (no BatchNorm: the reference's BN freezing is not implemented).
Every class's real batch is padded to B = min(batch_real, largest class) with masked
entries (exact: per-example networks and per-image DSA), so one compiled step serves all
classes. `context.mesh` is not used (one device).
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.data.dsa import same_transform
from kd_jax.dataset_distill.method import (Context, DistilledSet, Start, Step, class_ids,
                                           hard_label_set, iteration_key, iteration_rng)
from kd_jax.dataset_distill.synthetic import class_indices, init_images
from kd_jax.losses.features import safe_norm
from kd_jax.step import cross_entropy

DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
INITS = ("real", "noise")


def get_loops(ipc: int) -> tuple[int, int]:
  """(outer_loop, inner_loop) of the reference's `get_loops` (defined for ipc 1, 10, ..., 50)."""
  if ipc not in DC_LOOPS:
    raise ValueError(f"DC's loops are defined for ipc in {sorted(DC_LOOPS)}, not {ipc}; set "
                     "outer_loop and inner_loop explicitly")
  return DC_LOOPS[ipc]


def layer_distance(g_real: jax.Array, g_syn: jax.Array) -> jax.Array:
  """`distance_wb`: Σ over output units of 1 − cos(g_real, g_syn); 0 for rank ≤ 1 tensors.

  The output unit is the last axis (Flax HWIO conv, `[in, out]` dense, `[H, W, C]` layer-norm
  scale), so `[..., out]` becomes `[rest, out]`, PyTorch's `[out, rest]` transposed.
  """
  if g_real.ndim <= 1:
    return jnp.zeros((), jnp.float32)
  a = g_real.reshape(-1, g_real.shape[-1]).astype(jnp.float32)
  b = g_syn.reshape(-1, g_syn.shape[-1]).astype(jnp.float32)
  cos = jnp.sum(a * b, axis=0) / (safe_norm(a, axis=0) * safe_norm(b, axis=0) + 1e-6)
  return jnp.sum(1.0 - cos)


def match_loss(grads_syn, grads_real) -> jax.Array:
  """`match_loss` with dis_metric 'ours': Σ over the params tree's leaves of `layer_distance`."""
  real, syn = jax.tree.leaves(grads_real), jax.tree.leaves(grads_syn)
  return sum((layer_distance(r, s) for r, s in zip(real, syn)), jnp.zeros((), jnp.float32))


def masked_cross_entropy(params, apply_fn, images, label, mask) -> jax.Array:
  """Mean cross-entropy of `images` `[B, H, W, C]` against class `label` over mask-1 entries."""
  logits = apply_fn({"params": params}, images, train=True)[0].logits
  ce = cross_entropy(logits, jnp.full((images.shape[0],), label, jnp.int32))
  return jnp.sum(ce * mask) / jnp.sum(mask)


def class_matching_loss(syn_images, params, real_images, mask, label, key, *, apply_fn,
                        augment=None) -> jax.Array:
  """One class's term D(∇_θ ℓ(A(X_c)), ∇_θ ℓ(A(R_c))).

  Args:
    syn_images: `[ipc, H, W, C]` the class's synthetic images X_c.
    params: network params θ.
    real_images: `[B, H, W, C]` real batch R_c (entries with mask 0 are ignored).
    mask: `[B]` 1 for real entries, 0 for padding.
    label: the class id.
    key: the DSA key shared by both batches (unused without `augment`).
    apply_fn, augment: the network and DSA (`augment(images, key)`) or None.
  """
  if augment is not None:
    real_images = same_transform(augment, real_images, key)
    syn_images = same_transform(augment, syn_images, key)
  grad = jax.grad(masked_cross_entropy)
  g_real = jax.lax.stop_gradient(grad(params, apply_fn, real_images, label, mask))
  g_syn = grad(params, apply_fn, syn_images, label, jnp.ones(syn_images.shape[:1], jnp.float32))
  return match_loss(g_syn, g_real)


def sample_class_batches(rng: np.random.Generator, per_class: list[np.ndarray],
                         batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Real batches of every class, padded to one shape.

  Class c gets min(batch, n_c) distinct indices in random order (the reference's
  `get_images(c, batch)`), padded with its first index to B = min(batch, max_c n_c).
  Returns (`[C, B]` int32 indices, `[C, B]` float32 mask: 1 real, 0 padding).
  """
  width = min(batch, max(len(idx) for idx in per_class))
  indices = np.zeros((len(per_class), width), np.int32)
  mask = np.zeros((len(per_class), width), np.float32)
  for c, idx in enumerate(per_class):
    if len(idx) == 0:
      raise ValueError(f"class {c} has no real images")
    chosen = rng.permutation(idx)[:width]
    indices[c] = chosen[0]
    indices[c, :len(chosen)] = chosen
    mask[c, :len(chosen)] = 1.0
  return indices, mask


def sum_over_classes(class_value_and_grad: Callable, images: jax.Array, num_classes: int,
                     ipc: int) -> tuple[jax.Array, jax.Array]:
  """Σ_c value_c and the gradient w.r.t. `images` `[C·ipc, ...]` (class order) of an objective
  summed over classes, from `class_value_and_grad(c, images of class c) -> (value, grad)`."""
  total, grads = jnp.zeros(()), []
  for c in range(num_classes):
    value, grad = class_value_and_grad(c, images[c * ipc:(c + 1) * ipc])
    total, grads = total + value, grads + [grad]
  return total, jnp.concatenate(grads)


def image_start(context: Context, init: str, lr_img: float, momentum_img: float,
                state=None) -> Start:
  """DC's and DM's start: images from `init` ("real": random real images of each class;
  "noise"), learned by SGD with momentum; `state` carried between iterations."""
  images, _ = init_images(np.random.default_rng(context.seed), context.train_images,
                          context.train_labels, num_classes=context.num_classes,
                          ipc=context.ipc, init=init)
  return Start(values={"images": jnp.asarray(images)},
               optimizers={"images": optax.sgd(lr_img, momentum=momentum_img)},
               state={} if state is None else state)


@dataclasses.dataclass
class GradientMatching:
  """DC / DSA gradient matching (see the module docstring); values `{"images": [C·ipc, H, W, C]}`.

  Attributes:
    name: the method's name.
    iterations: protocol iterations (image updates); None: dc_iterations · outer_loop, fixed
      by `prepare` from context.ipc.
    dc_iterations: the reference's `Iteration` (1000): fresh networks per run.
    outer_loop, inner_loop: None: `get_loops(ipc)`.
    lr_img, momentum_img: SGD on the images (0.1, 0.5).
    lr_net, momentum_net: SGD on the network (0.01; the reference's `optimizer_net` has no
      momentum, so 0.0).
    batch_real: real images per class per update (256).
    batch_train: synthetic minibatch of the network's training (256).
    init: "real" (random real images of each class) or "noise" (standard normal).
  """
  name: str = "dc"
  iterations: int | None = None
  dc_iterations: int = 1000
  outer_loop: int | None = None
  inner_loop: int | None = None
  lr_img: float = 0.1
  momentum_img: float = 0.5
  lr_net: float = 0.01
  momentum_net: float = 0.0
  batch_real: int = 256
  batch_train: int = 256
  init: str = "real"

  def prepare(self, context: Context) -> None:
    if self.init not in INITS:
      raise ValueError(f"DC init must be one of {INITS}, got {self.init!r}")
    outer, inner = self.outer_loop, self.inner_loop
    if outer is None or inner is None:
      reference = get_loops(context.ipc)
      outer = reference[0] if outer is None else outer
      inner = reference[1] if inner is None else inner
    self._loops = (outer, inner)
    if self._loops[0] < 1 or self._loops[1] < 0:
      raise ValueError(f"DC needs outer_loop >= 1 and inner_loop >= 0, got {self._loops}")
    if self.iterations is None:
      self.iterations = self.dc_iterations * self._loops[0]
    self._context = context
    self._per_class = class_indices(np.asarray(context.train_labels), context.num_classes)
    self._real = jnp.asarray(context.train_images)
    self._labels = jnp.asarray(class_ids(context.num_classes, context.ipc))
    self._init = jax.jit(context.init_params)
    apply_fn, augment = context.apply_fn, context.augment

    def loss(syn_images, params, real_all, indices, mask, label, key):
      return class_matching_loss(syn_images, params, real_all[indices], mask, label, key,
                                 apply_fn=apply_fn, augment=augment)

    self._loss_and_grad = jax.jit(jax.value_and_grad(loss))

    def net_step(params, velocity, images, labels, indices, key):
      """torch SGD: v ← m·v + g, θ ← θ − lr·v, on A(images[indices]) (per-image DSA)."""
      x = images[indices]
      if augment is not None:
        x = augment(x, key)
      ce = lambda p: jnp.mean(cross_entropy(apply_fn({"params": p}, x, train=True)[0].logits,
                                            labels[indices]))
      value, g = jax.value_and_grad(ce)(params)
      velocity = jax.tree.map(lambda v, gi: self.momentum_net * v + gi, velocity, g)
      params = jax.tree.map(lambda p, v: p - self.lr_net * v, params, velocity)
      return params, velocity, value

    self._net_step = jax.jit(net_step)

  def start(self, context: Context) -> Start:
    shapes = jax.eval_shape(context.init_params, jax.random.key(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return image_start(context, self.init, self.lr_img, self.momentum_img,
                       state={"params": zeros, "velocity": zeros})

  def train_network(self, params, velocity, images, rng: np.random.Generator, key):
    """`inner_loop` epochs of the reference's `epoch('train', ...)` on `images` (hard labels):
    each a fresh permutation cut into minibatches of `batch_train` (the last may be smaller).
    Returns (params, velocity, mean minibatch loss)."""
    num = images.shape[0]
    losses = []
    for e in range(self._loops[1]):
      perm = rng.permutation(num).astype(np.int32)
      for b, lo in enumerate(range(0, num, self.batch_train)):
        params, velocity, value = self._net_step(
            params, velocity, images, self._labels, perm[lo:lo + self.batch_train],
            jax.random.fold_in(key, e * num + b))
        losses.append(value)
    return params, velocity, (jnp.mean(jnp.stack(losses)) if losses else jnp.zeros(()))

  def value_and_grad(self, values: dict, state, iteration: int) -> Step:
    ctx = self._context
    rng = iteration_rng(ctx.seed, iteration)
    net_key, train_key, aug_key = jax.random.split(iteration_key(ctx.seed, iteration), 3)
    images = values["images"]
    metrics = {}
    if iteration % self._loops[0] == 0:
      params = self._init(net_key)
      velocity = jax.tree.map(jnp.zeros_like, params)
    else:
      params, velocity, net_loss = self.train_network(state["params"], state["velocity"],
                                                      images, rng, train_key)
      metrics["net_loss"] = float(net_loss)
    indices, mask = sample_class_batches(rng, self._per_class, self.batch_real)
    total, grad = sum_over_classes(
        lambda c, x: self._loss_and_grad(x, params, self._real, indices[c], mask[c],
                                         np.int32(c), jax.random.fold_in(aug_key, c)),
        images, ctx.num_classes, ctx.ipc)
    return Step(loss=total, grads={"images": grad},
                state={"params": params, "velocity": velocity}, metrics=metrics)

  def distilled(self, values: dict) -> DistilledSet:
    return hard_label_set(values, self._context)
