"""Trajectory matching (MTT; Cazenavette et al., CVPR 2022) with an exact constant-memory gradient.

Inner training is N SGD steps on synthetic minibatches, θ_{i+1} = θ_i − α·g_i with
g_i = ∇_θ ℓ(θ_i; A_i(X[b_i]), Y[b_i]), built from `kd_jax.train_step` (`make_loss_and_grads` +
`sgd_update`; there is no second SGD). The matching loss is

  L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖².

Gradient modes (DESIGN.md §4):
  "exact"    two passes. The forward stores θ_0..θ_N (N·P floats, no activations); the backward
             takes the VJP of the same jitted step at θ_i with cotangent λ_{i+1}, giving
             λ_i = (I − α H_i) λ_{i+1} and accumulating ∂L/∂X, ∂L/∂Y, ∂L/∂α. Identical to
             unrolled autodiff; activation memory is one step's for any N.
  "tesla"    TESLA's released approximation (Cui et al., ICML 2023): the same loop with λ frozen
             at λ_N = 2(θ_N − θ*)/D, i.e. ∂L/∂X ≈ Σ_i −α (∂g_i/∂X)ᵀ λ_N. It drops every
             Hessian term (I − αH_j) between step i and N, so it is exact only when αH ≪ 1
             (about 2% off at α = 0.01, N = 5; far worse for larger α·N).
  "unrolled" full autodiff through the N steps in one jitted function; memory grows with N.
             The reference for tests.
The steps are separate jitted calls driven from Python, never `lax.scan`: on XLA:CPU a conv net
inside a while loop runs 40–70× slower.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kd_jax.train_step import make_kd_objective, make_loss_and_grads, sgd_update

MODES = ("exact", "tesla", "unrolled")
LABEL_KINDS = ("hard", "probs", "logits")


class SyntheticGrads(NamedTuple):
  """∂L/∂(images, labels, lr). `labels` is None when labels are not learned."""
  images: jax.Array
  labels: jax.Array | None
  lr: jax.Array


def label_targets(labels: jax.Array, label_kind: str) -> jax.Array:
  """Training targets from stored labels: class ids ("hard"), probabilities ("probs"), or the
  softmax of learned logits ("logits", DATM's soft cross-entropy)."""
  if label_kind == "logits":
    return jax.nn.softmax(labels.astype(jnp.float32), axis=-1).astype(labels.dtype)
  if label_kind in ("hard", "probs"):
    return labels
  raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")


def make_inner_step(apply_fn, unravel: Callable, *, label_kind: str = "hard",
                    augment: Callable | None = None):
  """Returns `step(theta, images, labels, lr, indices, key) -> theta_next`.

  Args:
    apply_fn: kd_jax apply function of a model without mutable state (e.g. ConvNet with
      instance norm).
    unravel: maps a flat `[P]` vector to the params tree (from `ravel_pytree`).
    label_kind: how `labels` become targets, see `label_targets`.
    augment: `augment(images, key) -> images`, e.g. DSA; None for no augmentation.
  The step's arguments: theta `[P]`; images `[S, H, W, C]`; labels `[S]` int or `[S, C]`;
  lr scalar α; indices `[batch_syn]` int; key a PRNG key fixing this step's augmentation.
  """
  if label_kind not in LABEL_KINDS:
    raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
  loss_and_grads = make_loss_and_grads(apply_fn, None, make_kd_objective(None))

  def step(theta, images, labels, lr, indices, key):
    x = images[indices]
    if augment is not None:
      x = augment(x, key)
    batch = {"image": x, "label": label_targets(labels[indices], label_kind)}
    params = unravel(theta)
    (_, (_, new_state)), grads = loss_and_grads(params, {}, {}, None, batch, key)
    if jax.tree.leaves(new_state):
      raise ValueError("trajectory matching needs a model without mutable state (batch_stats); "
                       "use e.g. convnet with norm='instancenorm'")
    return ravel_pytree(sgd_update(params, grads["student"], lr))[0]

  return step


def parameter_distance_loss(theta_n, theta_start, theta_target):
  """‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (MTT's normalised parameter loss)."""
  return jnp.sum((theta_n - theta_target) ** 2) / jnp.sum((theta_start - theta_target) ** 2)


class TrajectoryMatcher:
  """Value and gradient of the matching loss w.r.t. (images, labels, lr) in one of `MODES`.

  Call as `matcher(theta_start, theta_target, images, labels, lr, indices, keys)` with
  indices `[N, batch_syn]` and keys `[N]`; returns `(loss, SyntheticGrads)`.
  `learn_labels=False` treats labels as constants (hard labels or fixed probabilities).

  The jitted pieces are public for memory analysis: `step` (forward step), `vjp_step`
  (exact/tesla backward step) and `unrolled` (the whole unrolled value-and-grad).
  """

  def __init__(self, step_fn: Callable, *, mode: str = "exact", learn_labels: bool = False):
    if mode not in MODES:
      raise ValueError(f"trajectory matching mode must be one of {MODES}, got {mode!r}")
    self.mode = mode
    self.learn_labels = learn_labels
    self._step_fn = step_fn
    self.step = jax.jit(step_fn)
    self.vjp_step = jax.jit(self._vjp_step, donate_argnums=(7,))
    self.unrolled = jax.jit(self._unrolled)
    self.loss_and_cotangent = jax.jit(jax.value_and_grad(parameter_distance_loss))

  def _learnable(self, images, labels, lr) -> dict:
    return {"images": images, "lr": lr, **({"labels": labels} if self.learn_labels else {})}

  def _step_of(self, labels, indices, key):
    """The step as a function of (theta, learnable dict)."""
    return lambda theta, v: self._step_fn(theta, v["images"], v.get("labels", labels), v["lr"],
                                          indices, key)

  def _vjp_step(self, theta, images, labels, lr, indices, key, cotangent, acc):
    """One backward step: (λ_i, acc + ∂⟨θ_{i+1}, λ_{i+1}⟩/∂(images, [labels,] lr))."""
    _, vjp = jax.vjp(self._step_of(labels, indices, key), theta,
                     self._learnable(images, labels, lr))
    lam, grads = vjp(cotangent)
    return lam, jax.tree.map(jnp.add, acc, grads)

  def _unrolled(self, theta_start, theta_target, images, labels, lr, indices, keys):
    def loss_fn(learnable):
      theta = theta_start
      for i in range(indices.shape[0]):
        theta = self._step_of(labels, indices[i], keys[i])(theta, learnable)
      return parameter_distance_loss(theta, theta_start, theta_target)
    return jax.value_and_grad(loss_fn)(self._learnable(images, labels, lr))

  def forward(self, theta_start, images, labels, lr, indices, keys) -> list[jax.Array]:
    """θ_0..θ_N, each `[P]`: the only state the exact backward pass keeps."""
    thetas = [theta_start]
    for i in range(indices.shape[0]):
      thetas.append(self.step(thetas[-1], images, labels, lr, indices[i], keys[i]))
    return thetas

  def __call__(self, theta_start, theta_target, images, labels, lr, indices, keys):
    lr = jnp.asarray(lr, images.dtype)
    indices = jnp.asarray(indices)
    if indices.ndim != 2:
      raise ValueError(f"indices must be [N, batch_syn], got shape {indices.shape}")
    if self.mode == "unrolled":
      loss, grads = self.unrolled(theta_start, theta_target, images, labels, lr, indices, keys)
    else:
      thetas = self.forward(theta_start, images, labels, lr, indices, keys)
      loss, lam_n = self.loss_and_cotangent(thetas[-1], theta_start, theta_target)
      lam = lam_n
      grads = jax.tree.map(jnp.zeros_like, self._learnable(images, labels, lr))
      for i in reversed(range(indices.shape[0])):
        lam, grads = self.vjp_step(thetas[i], images, labels, lr, indices[i], keys[i],
                                   lam if self.mode == "exact" else lam_n, grads)
        thetas[i + 1] = None  # θ_{i+1} is no longer needed
    return loss, SyntheticGrads(images=grads["images"], labels=grads.get("labels"),
                                lr=grads["lr"])


def minibatch_plan(rng: np.random.Generator, num_synthetic: int, batch_syn: int,
                   num_steps: int) -> np.ndarray:
  """Indices `[N, batch_syn]`: consecutive chunks of fresh random permutations (as MTT)."""
  if batch_syn < 1 or num_synthetic % batch_syn:
    raise ValueError(f"batch_syn={batch_syn} must divide the number of synthetic images "
                     f"({num_synthetic}) so every inner step has the same shape")
  per_perm = num_synthetic // batch_syn
  perms = [rng.permutation(num_synthetic) for _ in range(-(-num_steps // per_perm))]
  return np.concatenate(perms).reshape(-1, batch_syn)[:num_steps].astype(np.int32)
