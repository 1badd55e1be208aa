"""Pure train and eval steps that combine a student, a frozen teacher and a loss.

The factories return plain functions; the caller jits them (with `donate_argnums`
and shardings). Dataset distillation differentiates through `make_loss_fn` and
`sgd_update`, so there is exactly one implementation of a training step.

Contract (DESIGN.md §2):
  apply_fn(variables, x, *, train, rngs=None) -> (ModelOutput, new_model_state)
where `variables = {"params": params, **model_state}` and `model_state` holds mutable
collections such as `batch_stats` (empty dict for stateless models).
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kd_jax.losses import get_loss, masked_mean
from kd_jax.models.output import ModelOutput

PyTree = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[..., tuple[ModelOutput, PyTree]]
# objective(student_out, teacher_out | None, batch, distill_params) -> (scalar loss, metrics)
Objective = Callable[[ModelOutput, ModelOutput | None, Batch, PyTree], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. The teacher is never in here.

  Attributes:
    step: int32 scalar.
    params: student model params.
    model_state: mutable model collections (e.g. `{"batch_stats": ...}`), or `{}`.
    distill_params: params of learnable loss parts (regressors, projectors), or `{}`.
    opt_state: optimizer state over `{"student": params, "distill": distill_params}`.
  """
  step: jax.Array
  params: PyTree
  model_state: PyTree
  distill_params: PyTree
  opt_state: PyTree

  @classmethod
  def create(cls, params, model_state, tx: optax.GradientTransformation, distill_params=None):
    distill_params = {} if distill_params is None else distill_params
    return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
               distill_params=distill_params,
               opt_state=tx.init({"student": params, "distill": distill_params}))


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


def _call_registered(spec, student_out: ModelOutput, teacher_out: ModelOutput, batch: Batch,
                     hparams: dict, student_feature: str | None, teacher_feature: str | None):
  """Feeds a registered loss the inputs its metadata asks for."""
  sources = {
      "student_logits": lambda: student_out.logits,
      "teacher_logits": lambda: teacher_out.logits,
      "labels": lambda: batch["label"],
      "mask": lambda: batch.get("mask"),
      "student_features": lambda: student_out.features[student_feature],
      "teacher_features": lambda: teacher_out.features[teacher_feature],
  }
  missing = [name for name in spec.inputs if name not in sources]
  if missing:
    raise ValueError(f"loss {spec.name!r} needs inputs {missing} that the generic KD objective "
                     "cannot provide; build a custom objective for it (see kd_jax.regimes)")
  if any(n.endswith("features") for n in spec.inputs) and not (student_feature and teacher_feature):
    raise ValueError(f"loss {spec.name!r} compares features: set distill.student_feature and "
                     "distill.teacher_feature to names the models return "
                     "(e.g. 'pre_logits', 'stage3')")
  return spec.fn(*(sources[name]() for name in spec.inputs), **hparams)


def make_kd_objective(loss_name: str | None = "kd", *, alpha: float = 0.9,
                      loss_hparams: dict | None = None, student_feature: str | None = None,
                      teacher_feature: str | None = None) -> Objective:
  """Builds `(1 − α)·CE(student, labels) + α·D(student, teacher)`.

  Args:
    loss_name: a registered loss (`kd_jax.losses.list_losses()`), or None for plain CE
      (the label-only baseline; then `alpha` is ignored).
    alpha: weight of the distillation term, in [0, 1].
    loss_hparams: keyword hyperparameters of the loss, e.g. `{"temperature": 4.0}`.
    student_feature, teacher_feature: feature names, for feature losses.
  Returns:
    objective(student_out, teacher_out, batch, distill_params) -> (loss, metrics). Padded
    examples (`batch["mask"] == 0`) do not count.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
  spec = get_loss(loss_name) if loss_name else None
  hparams = dict(loss_hparams or {})

  def objective(student_out, teacher_out, batch, distill_params):
    del distill_params  # the registry losses used here have no learnable parts
    mask = batch.get("mask")
    ce = masked_mean(cross_entropy(student_out.logits, batch["label"]), mask)
    metrics = {"task/ce": ce}
    if spec is None:
      return ce, metrics
    values = _call_registered(spec, student_out, teacher_out, batch, hparams,
                              student_feature, teacher_feature)
    distill = masked_mean(values, mask) if spec.per_example else jnp.asarray(values, jnp.float32)
    metrics[f"distill/{spec.name}"] = distill
    return (1.0 - alpha) * ce + alpha * distill, metrics

  return objective


def make_loss_fn(student_apply_fn: ApplyFn, teacher_apply_fn: ApplyFn | None,
                 objective: Objective):
  """Returns `loss_fn(trainable, model_state, teacher_vars, batch, rng) -> (loss, (metrics,
  new_model_state))` with `trainable = {"student": params, "distill": distill_params}`.

  The teacher runs in eval mode under `stop_gradient`; it receives no gradient.
  """

  def loss_fn(trainable, model_state, teacher_vars, batch, rng):
    student_out, new_model_state = student_apply_fn(
        {"params": trainable["student"], **model_state}, batch["image"], train=True,
        rngs={"dropout": rng})
    teacher_out = None
    if teacher_apply_fn is not None:
      teacher_out, _ = teacher_apply_fn(jax.lax.stop_gradient(teacher_vars), batch["image"],
                                        train=False)
      teacher_out = jax.lax.stop_gradient(teacher_out)
    loss, metrics = objective(student_out, teacher_out, batch, trainable["distill"])
    correct = (jnp.argmax(student_out.logits, -1) == _hard_labels(batch["label"]))
    metrics = {**metrics, "train/loss": loss,
               "train/accuracy": masked_mean(correct, batch.get("mask"))}
    return loss, (metrics, new_model_state)

  return loss_fn


def make_loss_and_grads(student_apply_fn: ApplyFn, teacher_apply_fn: ApplyFn | None,
                        objective: Objective):
  """Returns `loss_and_grads(params, model_state, distill_params, teacher_vars, batch, rng)`.

  The returned function gives `((loss, (metrics, new_model_state)), grads)` where
  `grads = {"student": ..., "distill": ...}` (see `make_loss_fn`).
  """
  loss_fn = make_loss_fn(student_apply_fn, teacher_apply_fn, objective)

  def loss_and_grads(params, model_state, distill_params, teacher_vars, batch, rng):
    trainable = {"student": params, "distill": distill_params}
    return jax.value_and_grad(loss_fn, has_aux=True)(trainable, model_state, teacher_vars,
                                                     batch, rng)

  return loss_and_grads


def _hard_labels(labels):
  return jnp.argmax(labels, -1) if labels.ndim == 2 else labels


def apply_update(state: TrainState, grads: PyTree, new_model_state: PyTree,
                 tx: optax.GradientTransformation) -> TrainState:
  """One optimizer update of the student (and learnable loss parts)."""
  trainable = {"student": state.params, "distill": state.distill_params}
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return state.replace(step=state.step + 1, params=trainable["student"],
                       distill_params=trainable["distill"], model_state=new_model_state,
                       opt_state=opt_state)


def sgd_update(params: PyTree, grads: PyTree, learning_rate) -> PyTree:
  """θ − α·g, the inner step that trajectory matching differentiates through."""
  return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)


def make_train_step(student_apply_fn: ApplyFn, teacher_apply_fn: ApplyFn | None,
                    objective: Objective, tx: optax.GradientTransformation):
  """Returns a pure `step(state, teacher_vars, batch, rng) -> (state, metrics)`.

  `metrics` is a flat dict of float32 scalars: `train/loss`, `train/accuracy`,
  `task/ce`, `distill/<loss>`, `grads/l2`. Jit it with `donate_argnums=0`.
  """
  loss_and_grads = make_loss_and_grads(student_apply_fn, teacher_apply_fn, objective)

  def step(state: TrainState, teacher_vars, batch: Batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, (metrics, new_model_state)), grads = loss_and_grads(
        state.params, state.model_state, state.distill_params, teacher_vars, batch, rng)
    new_state = apply_update(state, grads, new_model_state, tx)
    metrics = {**metrics, "grads/l2": optax.global_norm(grads)}
    return new_state, metrics

  return step


def make_eval_step(apply_fn: ApplyFn):
  """Returns `eval_step(variables, batch) -> sums` for exact accuracy with padding.

  `sums` holds `eval/correct`, `eval/loss_sum` and `eval/count` summed over real
  (mask == 1) examples; add them over batches, then divide by `eval/count`.
  """

  def eval_step(variables, batch: Batch):
    out, _ = apply_fn(variables, batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape[:1], jnp.float32)).astype(jnp.float32)
    labels = _hard_labels(batch["label"])
    correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32)
    loss = cross_entropy(out.logits, batch["label"])
    return {"eval/correct": jnp.sum(correct * mask), "eval/loss_sum": jnp.sum(loss * mask),
            "eval/count": jnp.sum(mask)}

  return eval_step
