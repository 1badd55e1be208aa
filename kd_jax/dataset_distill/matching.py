"""Trajectory matching (MTT; Cazenavette et al., CVPR 2022) with an exact constant-memory gradient.

Inner training is N SGD steps on synthetic minibatches, θ_{i+1} = θ_i − α·g_i with
g_i = ∇_θ ℓ(θ_i; A_i(X[b_i]), Y[b_i]); the update is `kd_jax.step.sgd_update` (there
is no second SGD). The matching loss is

  L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖².

Gradient modes (docs/design.md, "Dataset distillation")::

  "exact"    two passes. The forward stores θ_0..θ_N (N·P floats, no activations); the backward
             recomputes one step at θ_i with cotangent λ_{i+1}, giving λ_i = (I − α H_i) λ_{i+1}
             and accumulating ∂L/∂X, ∂L/∂Y, ∂L/∂α (`TrajectoryMatcher._vjp_step`). Identical to
             unrolled autodiff; activation memory is one step's for any N. With
             `keep_every=k` the forward keeps only θ_0, θ_k, θ_2k, ... (and θ_N) and the
             backward recomputes each block's k − 1 others from its first: ⌈N/k⌉ + k − 1 stored
             θ instead of N + 1, for N·(k − 1)/k more forward steps; the same gradient.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax import sharding
from kd_jax.distiller import supervised
from kd_jax.step import sgd_update

MODES = ("exact", "tesla", "unrolled")
LABEL_KINDS = ("hard", "probs", "logits")


class SyntheticGrads(NamedTuple):
  """∂L/∂(images, labels, lr). `labels` is None when labels are not learned."""
  images: jax.Array
  labels: jax.Array | None
  lr: jax.Array


def _at_least_f32(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def label_targets(labels: jax.Array, label_kind: str) -> jax.Array:
  """Training targets from stored labels: class ids ("hard"), probabilities ("probs"), or the
  softmax of learned logits ("logits", DATM's soft cross-entropy)."""
  if label_kind == "logits":
    return jax.nn.softmax(labels.astype(_at_least_f32(labels.dtype)), axis=-1).astype(labels.dtype)
  if label_kind in ("hard", "probs"):
    return labels
  raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")


class InnerStep:
  """One inner SGD step `step(theta, images, labels, lr, indices, key) -> θ − α·∇_θ ℓ`.

  `step.loss(theta, images, labels, indices, key)` is the inner loss ℓ; `TrajectoryMatcher`'s
  backward pass differentiates it directly (the step's Jacobian in θ, I − αH, is symmetric).
  That holds for this plain SGD update only: a subclass with another update (weight decay,
  momentum) must use the `"unrolled"` mode, or fold its term into `loss` (weight decay is
  ℓ + wd/2·‖θ‖²). `label_kind` (see `label_targets`; None: unknown) lets the matcher check that
  learned logits are learned.
  """

  def __init__(self, loss: Callable, label_kind: str | None = None):
    self.loss = loss
    self.label_kind = label_kind

  def __call__(self, theta, images, labels, lr, indices, key):
    return sgd_update(theta, jax.grad(self.loss)(theta, images, labels, indices, key), lr)


def make_inner_step(apply_fn, unravel: Callable, *, label_kind: str = "hard",
                    augment: Callable | None = None) -> InnerStep:
  """Returns the `InnerStep` of cross-entropy SGD on synthetic minibatches.

  The loss is the KD job's training loss (`kd_jax.distiller.supervised`, the label-only
  method), so dataset distillation differentiates through the same step as training.

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

  method = supervised(apply_fn)

  def loss(theta, images, labels, indices, key):
    x = images[indices]  # split over devices like `indices` (TrajectoryMatcher places them)
    if augment is not None:
      x = augment(x, key)
    batch = {"image": x, "label": label_targets(labels[indices], label_kind)}
    value, _ = method.loss({"student": unravel(theta)}, {}, {"model_state": {"student": {}}},
                           batch, 0, key)
    return value

  return InnerStep(loss, label_kind)


def parameter_distance_loss(theta_n, theta_start, theta_target):
  """‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (MTT's normalised parameter loss)."""
  return jnp.sum((theta_n - theta_target) ** 2) / jnp.sum((theta_start - theta_target) ** 2)


class TrajectoryMatcher:
  """Value and gradient of the matching loss w.r.t. (images, labels, lr) in one of `MODES`.

  Call as `matcher(theta_start, theta_target, images, labels, lr, indices, keys)` with
  theta `[P]`, indices `[N, batch_syn]` and keys `[N]`; returns `(loss, SyntheticGrads)`.
  With `segments=G > 1` every argument but images, labels and lr gains a leading `[G]` axis
  (G (expert, start epoch) segments) and the loss is the mean of the G segments' losses.
  `learn_labels=False` treats labels as constants (hard labels or fixed probabilities).

  The G segments run one after another inside each jitted piece: `jax.vmap` would batch the
  network's weights, turning every convolution into a grouped one (4.5× slower per segment
  on XLA:CPU, benchmarks/dd_sharding.py).

  `mesh` (from `kd_jax.sharding.make_mesh`): θ, images, labels and lr are replicated; each
  minibatch is split over the mesh's `data` (and `fsdp`) axes, and the G segments over its
  `segment` axis (`jax.shard_map`, manual over `segment` only): each device group runs its
  `G / |segment|` segments. No pmap. Results equal the 1-device ones up to summation order.

  The jitted pieces are public for memory analysis: `step` (forward step), `vjp_step`
  (exact/tesla backward step) and `unrolled` (the whole unrolled value-and-grad).
  """

  def __init__(self, step_fn: InnerStep, *, mode: str = "exact", learn_labels: bool = False,
               segments: int = 1, mesh: Mesh | None = None, keep_every: int = 1):
    if mode not in MODES:
      raise ValueError(f"trajectory matching mode must be one of {MODES}, got {mode!r}")
    if keep_every < 1:
      raise ValueError(f"keep_every (distill.keep_every) must be >= 1, got {keep_every}")
    if mode != "unrolled" and (not isinstance(step_fn, InnerStep)
                               or type(step_fn).__call__ is not InnerStep.__call__):
      raise ValueError(f"mode={mode!r} differentiates the plain SGD update θ − α·∇ℓ through "
                       f"InnerStep.loss, but {type(step_fn).__name__} has its own update, so the "
                       "gradient would be wrong; use mode='unrolled', or put the extra term into "
                       "the loss (weight decay: ℓ + wd/2·‖θ‖²) and keep InnerStep's update")
    label_kind = getattr(step_fn, "label_kind", None)
    if label_kind == "logits" and not learn_labels:
      raise ValueError("the inner step trains on learned label logits (label_kind='logits') but "
                       "learn_labels=False would drop their gradient; pass learn_labels=True, or "
                       "label_kind='probs' for fixed soft labels")
    if label_kind == "hard" and learn_labels:
      raise ValueError("learn_labels=True needs labels with a gradient, but label_kind='hard' "
                       "labels are class ids; use label_kind='logits' (DATM) to learn them")
    if segments < 1:
      raise ValueError(f"segments (distill.segments) must be >= 1, got {segments}")
    if mesh is not None and segments % sharding.axis_size(mesh, _segment_axis(mesh)):
      raise ValueError(f"distill.segments={segments} must be a multiple of the mesh's "
                       f"{sharding.SEGMENT_AXIS!r} axis size "
                       f"{sharding.axis_size(mesh, _segment_axis(mesh))}; change one of them")
    self.mode = mode
    self.learn_labels = learn_labels
    self.keep_every = keep_every
    self.segments = segments
    self.mesh = mesh
    self._batch_axes = (sharding.batch_axes(mesh) or None) if mesh is not None else None
    self._step_fn = step_fn
    step, backward, segment_loss = step_fn, self._backward_step, self._segment_unrolled_loss
    self._distance = parameter_distance_loss
    if segments > 1:
      step = self._per_segment(step, (0, None, None, None, 0, 0))
      backward = self._per_segment(backward, (0, None, None, None, 0, 0, 0))
      segment_loss = self._per_segment(segment_loss, (None, None, 0, 0, 0, 0))
      self._distance = jax.vmap(parameter_distance_loss)
    self._backward, self._segment_loss = backward, segment_loss
    self.step = jax.jit(step)
    self.vjp_step = jax.jit(self._vjp_step, donate_argnums=(7,))
    self.unrolled = jax.jit(self._unrolled)
    self.loss_and_cotangent = jax.jit(jax.value_and_grad(self._matching_loss))

  def _per_segment(self, fn: Callable, in_axes: tuple) -> Callable:
    """`fn` mapped over the leading segment axis of the arguments whose `in_axes` entry is 0,
    outputs stacked; on a mesh with a `segment` axis each device group maps its own share."""
    def mapped(*args):
      count = next(a.shape[0] for a, axis in zip(args, in_axes) if axis == 0)
      outs = [fn(*(a[j] if axis == 0 else a for a, axis in zip(args, in_axes)))
              for j in range(count)]
      return jax.tree.map(lambda *o: jnp.stack(o), *outs)

    axis = _segment_axis(self.mesh)
    if axis is None:
      return mapped
    specs = tuple(PartitionSpec(axis) if a == 0 else PartitionSpec() for a in in_axes)
    # check_vma=False: with it, a gradient taken inside the body w.r.t. a replicated input
    # (the images) is summed over the segment axis there, and `_vjp_step`'s sum over segments
    # would then count it |segment| times (tests/dataset_distill/test_distill_mesh.py).
    return jax.shard_map(mapped, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec(axis),
                         axis_names={axis}, check_vma=False)

  def _data(self, images, labels) -> dict:
    return {"images": images, **({"labels": labels} if self.learn_labels else {})}

  def _learnable(self, images, labels, lr) -> dict:
    return {**self._data(images, labels), "lr": lr}

  def _step_of(self, labels, indices, key):
    """The step as a function of (theta, learnable dict)."""
    return lambda theta, v: self._step_fn(theta, v["images"], v.get("labels", labels), v["lr"],
                                          indices, key)

  def _matching_loss(self, theta_n, theta_start, theta_target):
    return jnp.mean(self._distance(theta_n, theta_start, theta_target))

  def _backward_step(self, theta, images, labels, lr, indices, key, cotangent):
    """One segment's backward step: (λ_i, ∂⟨θ_{i+1}, λ_{i+1}⟩/∂(images, [labels,] lr)).

    With θ_{i+1} = θ_i − α ∇_θ ℓ(θ_i; v), v = (images, [labels]), and λ = λ_{i+1}:
    λ_i = λ − α H λ, ∂/∂v = −α (∂²ℓ/∂v∂θ) λ and ∂/∂α = −⟨∇_θ ℓ, λ⟩. All come from one
    forward-over-reverse pass, the JVP of ∇_{(θ, v)} ℓ in direction (λ, 0). This is the same
    gradient as `jax.vjp` of the step (reverse-over-reverse), which on XLA:CPU costs ≈ 3× more
    time for the same FLOPs (transposes of the weight-gradient convolutions).
    """
    data = self._data(images, labels)
    grad_fn = jax.grad(lambda th, d: self._step_fn.loss(th, d["images"], d.get("labels", labels),
                                                        indices, key), argnums=(0, 1))
    (g, _), (hvp, mixed) = jax.jvp(lambda th: grad_fn(th, data), (theta,), (cotangent,))
    grads = {**jax.tree.map(lambda m: -lr * m, mixed), "lr": -jnp.vdot(g, cotangent)}
    return cotangent - lr * hvp, grads

  def _vjp_step(self, theta, images, labels, lr, indices, key, cotangent, acc):
    """λ_i and `acc` plus this step's gradient, summed over segments."""
    cotangent, grads = self._backward(theta, images, labels, lr, indices, key, cotangent)
    if self.segments > 1:
      grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    return cotangent, jax.tree.map(jnp.add, acc, grads)

  def _segment_unrolled_loss(self, learnable, labels, theta_start, theta_target, indices, keys):
    theta = theta_start
    for i in range(indices.shape[0]):
      theta = self._step_of(labels, indices[i], keys[i])(theta, learnable)
    return parameter_distance_loss(theta, theta_start, theta_target)

  def _unrolled(self, theta_start, theta_target, images, labels, lr, indices, keys):
    loss_fn = lambda learnable: jnp.mean(self._segment_loss(
        learnable, labels, theta_start, theta_target, indices, keys))
    return jax.value_and_grad(loss_fn)(self._learnable(images, labels, lr))

  def _place(self, x, *spec):
    """`x` on the mesh with `spec`, the leading segment axis prepended when batched."""
    if self.mesh is None:
      return x
    if self.segments > 1:
      spec = (_segment_axis(self.mesh), *spec)
    placement = NamedSharding(self.mesh, PartitionSpec(*spec))
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # A key array cannot be put on other processes' devices; its raw data (numpy) can.
      data = jax.device_put(np.asarray(jax.random.key_data(x)), placement)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(x, placement)

  def _check_shapes(self, theta_start, indices):
    lead = (self.segments,) if self.segments > 1 else ()
    if theta_start.ndim != len(lead) + 1 or indices.ndim != len(lead) + 2 or (
        indices.shape[:len(lead)] != lead or theta_start.shape[:len(lead)] != lead):
      raise ValueError(f"with segments={self.segments}, theta must be {[*lead, 'P']} and indices "
                       f"{[*lead, 'N', 'batch_syn']}; got {theta_start.shape} and {indices.shape}")
    if self.mesh is not None:
      sharding.check_batch_size(
          self.mesh, indices.shape[-1], "distill.batch_syn",
          f"; change batch_syn, or put devices on a {sharding.SEGMENT_AXIS!r} axis and raise "
          "distill.segments")

  def forward(self, theta_start, images, labels, lr, indices, keys, start: int = 0,
              stop: int | None = None, keep_every: int = 1) -> dict[int, jax.Array]:
    """`{i: θ_i}` for the steps `start..stop` (default all N) whose offset from `start` is a
    multiple of `keep_every`, and `stop`; each `[P]` (`[G, P]`). With `keep_every=1` it is
    θ_0..θ_N, the only state the exact backward pass keeps."""
    stop = indices.shape[-2] if stop is None else stop
    kept, theta = {start: theta_start}, theta_start
    for i in range(start, stop):
      theta = self.step(theta, images, labels, lr, self._batch(indices, i), keys[..., i])
      if (i + 1 - start) % keep_every == 0 or i + 1 == stop:
        kept[i + 1] = theta
    return kept

  def _batch(self, indices, i):
    """Step i's minibatch indices, `[batch_syn]` (`[G, batch_syn]`), split over the data axes."""
    return self._place(indices[..., i, :], self._batch_axes)

  def __call__(self, theta_start, theta_target, images, labels, lr, indices, keys):
    lr = jnp.asarray(lr, images.dtype)
    indices = np.asarray(indices)
    self._check_shapes(theta_start, indices)
    theta_start, theta_target, keys = (self._place(x) for x in (theta_start, theta_target, keys))
    if self.mesh is not None:
      images, labels, lr = jax.device_put((images, labels, lr),
                                          NamedSharding(self.mesh, PartitionSpec()))
    if self.mode == "unrolled":
      loss, grads = self.unrolled(theta_start, theta_target, images, labels, lr,
                                  self._place(indices, None, self._batch_axes), keys)
    else:
      num_steps, k = indices.shape[-2], self.keep_every
      kept = self.forward(theta_start, images, labels, lr, indices, keys, keep_every=k)
      loss, lam_n = self.loss_and_cotangent(kept.pop(num_steps), theta_start, theta_target)
      lam = lam_n
      grads = jax.tree.map(jnp.zeros_like, self._learnable(images, labels, lr))
      for block in reversed(range(0, num_steps, k)):  # steps block..end-1 from θ_block
        end = min(block + k, num_steps)
        thetas = self.forward(kept.pop(block), images, labels, lr, indices, keys, block, end - 1)
        for i in reversed(range(block, end)):
          lam, grads = self.vjp_step(thetas.pop(i), images, labels, lr, self._batch(indices, i),
                                     keys[..., i], lam if self.mode == "exact" else lam_n, grads)
    return loss, SyntheticGrads(images=grads["images"], labels=grads.get("labels"),
                                lr=grads["lr"])


def _segment_axis(mesh: Mesh | None) -> str | None:
  """The mesh's segment axis name, or None when there is no mesh or no such axis."""
  return sharding.SEGMENT_AXIS if mesh is not None and sharding.SEGMENT_AXIS in mesh.shape else None


def minibatch_plan(rng: np.random.Generator, num_synthetic: int, batch_syn: int,
                   num_steps: int) -> np.ndarray:
  """Indices `[N, batch_syn]`: consecutive chunks of fresh random permutations (as MTT)."""
  if batch_syn < 1 or num_synthetic % batch_syn:
    raise ValueError(f"batch_syn={batch_syn} must divide the number of synthetic images "
                     f"({num_synthetic}) so every inner step has the same shape")
  per_perm = num_synthetic // batch_syn
  perms = [rng.permutation(num_synthetic) for _ in range(-(-num_steps // per_perm))]
  return np.concatenate(perms).reshape(-1, batch_syn)[:num_steps].astype(np.int32)
