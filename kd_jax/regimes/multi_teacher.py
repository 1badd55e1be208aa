"""Multi-teacher distillation: one student, N frozen teachers (a `kd_jax.step.Method`).

The loss is the `Distiller` terms given (CE, feature terms, MEAL V2's discriminator, ...) plus

    kd_weight · Σ_k w_k · KD_k,   KD_k = T²·KL(softmax(t_k / (τ_k·T)) ‖ softmax(s / T)),

one KD term per teacher (logged as `terms/kd_<teacher>`), with Σ_k w_k = 1. Cross-entropy is
linear in its target, so the student's gradient is that of T²·KL(Σ_k w_k p_k ‖ p_s): the soft
targets are averaged in probability space, as MEAL V2 does (equal weights, T = τ = 1 is its
loss; Shen & Savvides, "MEAL V2", NeurIPS-W 2020). Teachers may differ in architecture; they
must predict the student's classes.

The weights w are fixed, or balanced inside the step as MTARD does (`MTARDBalance`): each
teacher's temperature τ_k follows the entropy of its soft targets, and w follows the
normalised loss-decrease rates. That state lives in `extra["multi_teacher"]`.
"""
import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses, trainer
from kd_jax.distiller import Distiller, Term
from kd_jax.models.output import ModelOutput

STATE = "multi_teacher"


@dataclasses.dataclass(frozen=True)
class MTARDBalance:
  """MTARD's two balancing rules, applied once per step to K teachers.

  Normalisation loss balance (Zhao et al., "Enhanced Accuracy and Robustness via Multi-Teacher
  Adversarial Distillation", ECCV 2022): with L̂_k = L_k / L_k(step 0) the relative loss of
  teacher k, w ← w − weight_rate·(w − L̂ / Σ_k L̂_k). A teacher whose term decreases slower gets
  more weight; w stays on the simplex for weight_rate ∈ (0, 1]. The new weights already weigh
  the step that computed them, as in the reference.

  Entropy-based balance (B-MTARD, Zhao, Wang & Wei, TPAMI 2024): τ_k ← clip(τ_k −
  temperature_rate·sign(H_k − mean_j H_j), min_temperature, max_temperature), H_k the mean
  entropy of teacher k's soft targets; a softer teacher is sharpened, a sharper one softened.
  For two teachers this is the reference's sign(H_k / H_other − 1).

  Reference: zhaoshiji123/MTARD-extension `resnet18_mtard_cifar10.py` (defaults from it).
  Departures: K teachers instead of the clean/robust pair; both rates are constant (the
  reference divides them by 10 at each learning-rate decay).
  """
  weight_rate: float = 0.025
  temperature_rate: float = 0.001
  min_temperature: float = 1.0
  max_temperature: float = 10.0

  def __post_init__(self):
    checks = {"weight_rate": (0 < self.weight_rate <= 1, "in (0, 1]"),
              "temperature_rate": (self.temperature_rate >= 0, ">= 0"),
              "min_temperature": (self.min_temperature > 0, "> 0"),
              "max_temperature": (self.max_temperature >= self.min_temperature,
                                  f">= min_temperature ({self.min_temperature})")}
    for name, (ok, requirement) in checks.items():
      value = getattr(self, name)
      if not (math.isfinite(value) and ok):
        raise ValueError(f"multi_teacher.balance: {name} must be {requirement}, got {value}")

  def init(self, weights: jax.Array) -> dict:
    """The state for `[K]` initial weights: temperatures 1 (clipped), no initial losses yet."""
    k = weights.shape[0]
    return {"weights": weights,
            "temperatures": jnp.clip(jnp.ones(k), self.min_temperature, self.max_temperature),
            "initial_losses": jnp.zeros(k)}

  def update(self, state: dict, values: jax.Array, entropies: jax.Array, step) -> dict:
    """The next state from this step's `[K]` teacher terms and soft-target entropies."""
    values, entropies = jax.lax.stop_gradient((values, entropies))
    initial = jnp.where(step == 0, values, state["initial_losses"])
    relative = values / jnp.maximum(initial, jnp.finfo(jnp.float32).tiny)
    total = jnp.sum(relative)
    target = jnp.where(total > 0, relative / jnp.maximum(total, jnp.finfo(jnp.float32).tiny),
                       state["weights"])
    weights = state["weights"] - self.weight_rate * (state["weights"] - target)
    temperatures = jnp.clip(
        state["temperatures"] - self.temperature_rate * jnp.sign(entropies - jnp.mean(entropies)),
        self.min_temperature, self.max_temperature)
    return {"weights": weights, "temperatures": temperatures, "initial_losses": initial}


def _given(output: ModelOutput, x, *, train, rngs=None):
  """A "teacher" whose variables are its output, computed once by `MultiTeacher.loss`."""
  del x, train, rngs
  return output, {}


def _entropy(logits: jax.Array) -> jax.Array:
  """`[B, C]` → `[B]` entropy of softmax(logits)."""
  return -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), axis=-1)


class MultiTeacher:
  """A student distilled from N frozen teachers (a `kd_jax.step.Method`; see the module doc).

  Args:
    student: the student's apply function.
    teachers: `{name: apply_fn}`, at least one; their variables come as `variables[name]`.
    terms: the other `Distiller` terms (default: CE). Terms that read a teacher must use
      `view`; name several teachers in `teacher_name` to stack them (the MEAL V2
      discriminator sees their mean logits).
    weights: `[K]` non-negative per-teacher weights, normalised to sum 1 (default equal);
      with `balance`, the initial weights.
    balance: `MTARDBalance` to adapt the weights and per-teacher temperatures in the step.
    temperature: T of every teacher's KD term (MTARD's reference uses 1).
    kd_weight: the weight of Σ_k w_k·KD_k.
    view: the batch key the teachers and their terms see.

  State: the `Distiller`'s (`trainable = {"student", <term heads>}`, `frozen = {teacher name:
  variables}`) plus, with `balance`, `extra["multi_teacher"] = {"weights": [K],
  "temperatures": [K], "initial_losses": [K]}` in the order of `teachers`.
  Metrics: `terms/kd_<teacher>` and, with `balance`, `multi_teacher/<teacher>/{weight,
  temperature,entropy}`.
  """

  evolving_frozen = ()  # the teachers never change

  def __init__(self, student: Callable, teachers: Mapping[str, Callable], *,
               terms: Sequence[Term] = (Term("ce"),), weights: Sequence[float] | None = None,
               balance: MTARDBalance | None = None, temperature: float = 4.0,
               kd_weight: float = 1.0, view: str = "image"):
    if not teachers:
      raise ValueError("multi_teacher: no teachers; give at least one {name: apply_fn}")
    self.names = tuple(teachers)
    self.teachers = dict(teachers)
    weights = np.ones(len(self.names)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (len(self.names),) or not np.all(np.isfinite(weights)) or np.any(
        weights < 0) or weights.sum() <= 0:
      raise ValueError(f"multi_teacher: weights must be {len(self.names)} non-negative numbers "
                       f"(one per teacher: {', '.join(self.names)}) with a positive sum, got "
                       f"{weights.tolist()}")
    self.weights = (weights / weights.sum()).astype(np.float32)
    if not (math.isfinite(temperature) and temperature > 0):
      raise ValueError(f"multi_teacher: temperature must be > 0, got {temperature}")
    if not math.isfinite(kd_weight):
      raise ValueError(f"multi_teacher: kd_weight must be finite, got {kd_weight}")
    self.balance, self.temperature, self.kd_weight, self.view = (balance, temperature, kd_weight,
                                                                 view)
    if any((t.name or t.loss) == STATE for t in terms):
      raise ValueError(f"multi_teacher: {STATE!r} is a reserved term name")
    kd_terms = [Term("kd", weight=0.0, hparams={"temperature": temperature}, teacher_name=name,
                     view=view, name=self.term_name(name)) for name in self.names]
    self.distiller = Distiller(student, [*terms, *kd_terms], {n: _given for n in self.names})
    elsewhere = [c.where for c in self.distiller.terms if c.uses_teacher and c.term.view != view]
    if elsewhere:
      raise ValueError(f"multi_teacher: {', '.join(elsewhere)} read a teacher on another view "
                       f"than {view!r}; the teachers see only view={view!r}")

  @staticmethod
  def term_name(teacher: str) -> str:
    """The name of `teacher`'s KD term (metrics `terms/<it>`)."""
    return f"kd_{teacher}"

  @property
  def ascending_parts(self) -> tuple[str, ...]:
    return self.distiller.ascending_parts

  def _teacher_outputs(self, frozen, batch, temperatures) -> dict[str, ModelOutput]:
    """Each teacher's output on `view`, its logits divided by its temperature τ_k."""
    if self.view not in batch:
      raise ValueError(f"multi_teacher: the batch has no view {self.view!r} (it has "
                       f"{sorted(batch)})")
    outputs = {}
    for k, name in enumerate(self.names):
      out, _ = self.teachers[name](jax.lax.stop_gradient(frozen[name]), batch[self.view],
                                   train=False)
      outputs[name] = jax.lax.stop_gradient(out.replace(logits=out.logits / temperatures[k]))
    return outputs

  def init(self, rng: jax.Array, variables: Mapping[str, dict], batch) -> tuple:
    """`variables = {"student": {...}, <teacher name>: {...}}` → (trainable, frozen, extra)."""
    missing = [n for n in ("student", *self.names) if n not in variables]
    if missing:
      raise ValueError(f"multi_teacher: no variables for {missing} (given: {sorted(variables)})")
    frozen = {name: variables[name] for name in self.names}
    outputs = jax.eval_shape(lambda f, b: self._teacher_outputs(f, b, jnp.ones(len(self.names))),
                             frozen, batch)
    student = jax.eval_shape(lambda v, x: self.distiller.student(v, x, train=False)[0],
                             variables["student"], batch[self.view])
    classes = {"student": student.logits.shape[-1],
               **{name: out.logits.shape[-1] for name, out in outputs.items()}}
    if len(set(classes.values())) > 1:
      found = ", ".join(f"{name} {count}" for name, count in classes.items())
      raise ValueError(f"multi_teacher: the class counts differ ({found}); every teacher must "
                       "predict the student's classes")
    trainable, _, extra = self.distiller.init(rng, {"student": variables["student"], **outputs},
                                              batch)
    if self.balance is not None:
      extra[STATE] = self.balance.init(jnp.asarray(self.weights))
    return trainable, frozen, extra

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """The distiller's terms + kd_weight·Σ_k w_k·KD_k; see `kd_jax.step.Method.loss`."""
    state = extra.get(STATE)
    temperatures = jnp.ones(len(self.names)) if state is None else state["temperatures"]
    outputs = self._teacher_outputs(frozen, batch, temperatures)
    total, (metrics, new_extra) = self.distiller.loss(trainable, outputs, extra, batch, step, rng)
    values = jnp.stack([metrics[f"terms/{self.term_name(n)}"] for n in self.names])
    weights = jnp.asarray(self.weights)
    if state is not None:
      entropies = jnp.stack([
          losses.masked_mean(_entropy(outputs[n].logits / self.temperature), batch.get("mask"))
          for n in self.names])
      new_extra = {**new_extra, STATE: self.balance.update(state, values, entropies, step)}
      weights = new_extra[STATE]["weights"]
      for k, name in enumerate(self.names):
        metrics[f"{STATE}/{name}/weight"] = weights[k]
        metrics[f"{STATE}/{name}/temperature"] = temperatures[k]
        metrics[f"{STATE}/{name}/entropy"] = entropies[k]
    return total + self.kd_weight * jnp.sum(weights * values), (metrics, new_extra)

  def after_update(self, old, new):
    return self.distiller.after_update(old, new)


def stage(name: str, student: tuple[Callable, dict], teachers: Mapping[str, tuple[Callable, dict]],
          *, tx: optax.GradientTransformation, num_steps: int, metadata: dict | None = None,
          **method_kwargs) -> trainer.Stage:
  """A `trainer.Stage` training `MultiTeacher` from `(apply_fn, variables)` pairs.

  `method_kwargs` go to `MultiTeacher`. The checkpoint metadata records the teachers and
  whether they are balanced, so a resume with another teacher set fails by name.
  """
  method = MultiTeacher(student[0], {n: apply for n, (apply, _) in teachers.items()},
                        **method_kwargs)
  variables = {"student": student[1], **{n: v for n, (_, v) in teachers.items()}}
  metadata = {**(metadata or {}), "regime": "multi_teacher", "teachers": list(method.names),
              "balanced": method.balance is not None}
  return trainer.Stage(name, method, variables, metadata, tx, num_steps)
