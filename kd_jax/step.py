"""The general training step: trainable and frozen networks, loss state, several optimizers.

A *method* says what is trained and how the loss is computed (`Method`); `make_train_step`
turns it into one pure function `step(state, batch, rng) -> (state, metrics)` that the caller
jits (with `donate_argnums=0` and mesh shardings, see `kd_jax.sharding.shard_train_step`).
Knowledge distillation (`kd_jax.distiller.Distiller`), plain supervised training and the
inner step of dataset distillation are all methods run by this one step.

Model contract: `apply_fn(variables, x, *, train, rngs=None) -> (ModelOutput, new_model_state)`
with `variables = {"params": params, **model_state}` (`kd_jax.models.make_apply_fn` adapts a
Flax linen module; any function with this signature works).
"""
from typing import Any, Callable, Protocol

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, the number of updates done.
    trainable: `{part: params}` — the student, peers and learnable loss parts (adapters,
      embeddings, a discriminator); one optimizer label per top-level key.
    frozen: `{name: variables}` — networks that receive no gradient (teachers, an EMA copy).
    extra: loss and model state that is not trained by gradients: `{"model_state":
      {part: {"batch_stats": ...}}, ...}` plus e.g. a memory bank or running class means.
    opt_state: the optimizer state over `trainable`.
  """
  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  extra: PyTree
  opt_state: PyTree

  @classmethod
  def create(cls, tx: optax.GradientTransformation, trainable, frozen=None, extra=None):
    return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
               frozen={} if frozen is None else frozen, extra={} if extra is None else extra,
               opt_state=tx.init(trainable))


class Method(Protocol):
  """What a training step needs to know.

  `init(rng, variables, batch) -> (trainable, frozen, extra)` builds the initial state from the
  networks' variables (`{name: {"params", **model_state}}`) and an example batch (for shapes).
  `loss(trainable, frozen, extra, batch, step, rng) -> (loss, (metrics, new_extra))` is
  differentiated with respect to `trainable` only.
  `after_update(old_state, new_state) -> new_state` runs after the optimizer update (EMA
  teachers, freezing a pre-trained part).
  `evolving_frozen` names the frozen networks that `after_update` changes: checkpoints hold
  those, not the fixed teachers (`kd_jax.trainer.checkpointed`).
  """
  evolving_frozen: tuple[str, ...] = ()

  def init(self, rng: jax.Array, variables: dict, batch: Batch) -> tuple[PyTree, PyTree, PyTree]:
    ...

  def loss(self, trainable, frozen, extra, batch: Batch, step: jax.Array,
           rng: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
    ...

  def after_update(self, old_state: TrainState, new_state: TrainState) -> TrainState:
    ...


def make_train_step(method: Method, tx: optax.GradientTransformation) -> Callable:
  """Returns the pure `step(state, batch, rng) -> (state, metrics)`.

  `rng` is the run's key; each step folds in `state.step`, so a resumed run draws what an
  uninterrupted run draws. `metrics` is a flat dict of scalars: the method's metrics plus
  `train/loss` and `grads/l2`. Jit it with `donate_argnums=0`; it traces once.
  """

  def step(state: TrainState, batch: Batch, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, (metrics, extra)), grads = jax.value_and_grad(method.loss, has_aux=True)(
        state.trainable, state.frozen, state.extra, batch, state.step, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_state = state.replace(step=state.step + 1,
                              trainable=optax.apply_updates(state.trainable, updates),
                              extra=extra, opt_state=opt_state)
    new_state = method.after_update(state, new_state)
    return new_state, {**metrics, "train/loss": loss, "grads/l2": optax.global_norm(grads)}

  return step


def ascend(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the negated gradient: its parameters climb the loss the others descend
  (a discriminator against the student)."""
  return optax.chain(optax.scale(-1.0), tx)


def per_part_optimizer(trainable, default: optax.GradientTransformation,
                       overrides: dict[str, optax.GradientTransformation] | None = None
                       ) -> optax.GradientTransformation:
  """One optimizer per top-level key of `trainable` (`optax.multi_transform` over those labels):
  `overrides[key]` where given, else `default`. Each part keeps its own optimizer state."""
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(trainable))
  if unknown:
    raise ValueError(f"optimizer overrides for {unknown}, but the trainable parts are "
                     f"{sorted(trainable)}")

  def labels(tree):
    return {key: jax.tree.map(lambda _, k=key: k, sub) for key, sub in tree.items()}

  return optax.multi_transform({k: overrides.get(k, default) for k in trainable}, labels)


def sgd_update(params: PyTree, grads: PyTree, learning_rate) -> PyTree:
  """θ − α·g, the inner step that trajectory matching differentiates through."""
  return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in at least float32 (bf16 → f32; f64 stays f64).

  Args:
    logits: `[B, C]`.
    labels: `[B]` integer class ids, or `[B, C]` soft targets (probabilities).
  Returns:
    `[B]`.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def hard_labels(labels: jax.Array) -> jax.Array:
  """`[B]` class ids from `[B]` ids or `[B, C]` soft labels (their argmax)."""
  return jnp.argmax(labels, -1) if labels.ndim == 2 else labels


def make_eval_step(apply_fn: Callable):
  """Returns `eval_step(variables, batch) -> sums` for exact accuracy with padding.

  `sums` holds `eval/correct`, `eval/loss_sum` and `eval/count` summed over real
  (mask == 1) examples; add them over batches, then divide by `eval/count`.
  """

  def eval_step(variables, batch: Batch):
    out, _ = apply_fn(variables, batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape[:1], jnp.float32)).astype(jnp.float32)
    correct = (jnp.argmax(out.logits, -1) == hard_labels(batch["label"])).astype(jnp.float32)
    loss = cross_entropy(out.logits, batch["label"])
    return {"eval/correct": jnp.sum(correct * mask), "eval/loss_sum": jnp.sum(loss * mask),
            "eval/count": jnp.sum(mask)}

  return eval_step
