"""TGeo-KD: a per-example fusion ratio of ground truth and teacher, learned from the geometry of
student prediction, teacher prediction and label (a `kd_jax.step.Method`).

Hu, Wu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation", ICLR 2024 (arXiv 2312.15112). The student minimises, over the training rows i,

    L_S(θ, α) = mean_i α_i·CE(s_i, y_i) + (1 − α_i)·T²·KL(softmax(t_i/T) ‖ softmax(s_i/T)),

α_i = sigmoid(f_ω(r_i)) ∈ (0, 1) from a small MLP f_ω (the fusion network) on the relations of
p_s = softmax(s_i) (under stop-gradient), p_t = softmax(t_i), the one-hot label g_i and the
teacher's mean prediction t̄ = mean of p_t over the training rows of class y_i:

    r_i = [p_s − p_t, p_t − g_i, g_i − p_s, p_s − t̄, t̄ − g_i]   ([5C]),

the edges of the intra-sample triangle (S, T, G) and of the inter-sample one (S, T̄, G). The
fusion network is fitted to held-out rows (x', y') inside the same step by one-step lookahead
(the bilevel problem approximated as in Ren et al., "Learning to Reweight Examples", 2018):

    θ'(ω) = θ − η·∇_θ L_S(θ, α(ω)),     L_H(ω) = mean_j CE(f(x'_j; θ'(ω)), y'_j),

differentiated through the virtual SGD step. The step's loss is L_S(θ, sg(α)) + L_H(ω) with θ
stopped in L_H: the student's gradient is ∇_θ L_S and does not see the held-out rows, the
fusion network's is ∇_ω L_H.

Departures: student and fusion network update at once from the same α (the alternating scheme
updates ω first and then θ with the new α); the virtual step is plain SGD with `lookahead_lr`,
not the student's optimizer; t̄ is a running mean over the training rows seen so far (this batch
included), not a pass over the training set; r_i and the fusion network's width are our reading
of the paper's intra- and inter-sample relations, not transcribed from a reference
implementation; α is the ground truth's share here (1 − α the teacher's); BatchNorm in the
virtual student uses the held-out batch's statistics and its updates are discarded.
"""
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from kd_jax import distiller, losses, trainer
from kd_jax.models.mlp import MLP
from kd_jax.step import TrainState, cross_entropy, hard_labels, sgd_update

STATE = "tgeo"
HELDOUT = "heldout_"  # batch keys of the held-out rows: heldout_image, heldout_label, heldout_mask


def attach_heldout(batch: dict, heldout: dict) -> dict:
  """`batch` with `heldout`'s image, label and mask as `heldout_image`, `heldout_label`,
  `heldout_mask` (the rows the fusion network is fitted to)."""
  return {**batch, **{HELDOUT + k: heldout[k] for k in ("image", "label", "mask") if k in heldout}}


def relations(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
              class_means: jax.Array) -> jax.Array:
  """The fusion network's input r_i (see the module docstring).

  Args:
    student_logits, teacher_logits: `[B, C]`.
    labels: `[B]` ids or `[B, C]` soft labels (then g_i is the soft label).
    class_means: `[C, C]` the teacher's mean prediction per class.
  Returns:
    `[B, 5C]` float32.
  """
  p_s = jax.nn.softmax(jax.lax.stop_gradient(student_logits).astype(jnp.float32))
  p_t = jax.nn.softmax(teacher_logits.astype(jnp.float32))
  num_classes = p_s.shape[-1]
  g = labels.astype(jnp.float32) if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
  t_bar = class_means[hard_labels(labels)]
  return jnp.concatenate([p_s - p_t, p_t - g, g - p_s, p_s - t_bar, t_bar - g], axis=-1)


class TGeoKD:
  """A student distilled with per-example fusion ratios from a fusion network trained on
  held-out rows (see the module docstring).

  Args:
    student, teacher: apply functions; their variables come as `variables["student"]` and
      `variables["teacher"]`. Both predict the same C classes.
    lookahead_lr: η of the virtual SGD step (the student's learning rate).
    temperature: T of the KD term.
    hidden_sizes: the fusion MLP's hidden widths.

  Batches: `image`, `label` (`mask`) plus the held-out rows `heldout_image`, `heldout_label`
  (`heldout_mask`), see `attach_heldout`.
  State: `trainable = {"student", "fusion"}`, `frozen = {"teacher"}`, `extra = {"model_state":
  {"student": ...}, "tgeo": {"sums": [C, C], "counts": [C]}}` (the teacher's summed predictions
  per class, for t̄).
  Metrics: `terms/{ce,kd}` (unweighted means), `terms/fused` (L_S), `terms/heldout` (L_H),
  `tgeo/alpha` (mean α), `train/accuracy`; `train/loss` is L_S + L_H.
  """

  evolving_frozen = ()  # the teacher never changes

  def __init__(self, student: Callable, teacher: Callable, *, lookahead_lr: float,
               temperature: float = 4.0, hidden_sizes: Sequence[int] = (64,)):
    checks = {"lookahead_lr": (lookahead_lr, "> 0"), "temperature": (temperature, "> 0")}
    for field, (value, requirement) in checks.items():
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tgeo: {field} must be {requirement}, got {value}")
    if not hidden_sizes or any(int(w) < 1 for w in hidden_sizes):
      raise ValueError(f"tgeo: hidden_sizes must list positive widths, got {list(hidden_sizes)}")
    self.student, self.teacher = student, teacher
    self.lookahead_lr, self.temperature = lookahead_lr, temperature
    self.fusion = MLP(num_classes=1, hidden_sizes=tuple(int(w) for w in hidden_sizes))

  @staticmethod
  def _check_batch(batch) -> None:
    missing = [k for k in ("image", "label", HELDOUT + "image", HELDOUT + "label")
               if k not in batch]
    if missing:
      raise ValueError(f"tgeo: the batch has no {missing} (it has {sorted(batch)}); the fusion "
                       "network needs held-out rows, see tgeo.attach_heldout")

  def fusion_ratio(self, fusion_params, relation: jax.Array) -> jax.Array:
    """`[B, 5C]` relations → `[B]` α ∈ (0, 1)."""
    out = self.fusion.apply({"params": fusion_params}, relation, train=False)
    return jax.nn.sigmoid(out.logits[:, 0])

  def fused_loss(self, student_logits, teacher_logits, labels, alpha, mask=None):
    """L_S: `mean_i α_i·CE_i + (1 − α_i)·KD_i` and the unweighted `(CE, KD)` means."""
    ce = cross_entropy(student_logits, labels)
    kd = losses.kd(student_logits, teacher_logits, temperature=self.temperature)
    return (losses.masked_mean(alpha * ce + (1.0 - alpha) * kd, mask),
            (losses.masked_mean(ce, mask), losses.masked_mean(kd, mask)))

  def init(self, rng: jax.Array, variables: Mapping[str, dict], batch) -> tuple:
    """`variables = {"student": {...}, "teacher": {...}}` → (trainable, frozen, extra)."""
    missing = [n for n in ("student", "teacher") if n not in variables]
    if missing:
      raise ValueError(f"tgeo: no variables for {missing} (given: {sorted(variables)})")
    self._check_batch(batch)
    classes = {name: jax.eval_shape(lambda v, x, a=apply: a(v, x, train=False)[0],
                                    variables[name], batch["image"]).logits.shape[-1]
               for name, apply in (("student", self.student), ("teacher", self.teacher))}
    if classes["student"] != classes["teacher"]:
      raise ValueError(f"tgeo: the class counts differ (student {classes['student']}, teacher "
                       f"{classes['teacher']}); the teacher must predict the student's classes")
    c = classes["student"]
    student = dict(variables["student"])
    trainable = {"student": student.pop("params"),
                 "fusion": self.fusion.init(rng, jnp.zeros((1, 5 * c)), train=False)["params"]}
    extra = {"model_state": {"student": student},
             STATE: {"sums": jnp.zeros((c, c)), "counts": jnp.zeros((c,))}}
    return trainable, {"teacher": variables["teacher"]}, extra

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """L_S(θ, sg(α)) + L_H(ω); see `kd_jax.step.Method.loss`."""
    del step
    self._check_batch(batch)
    mask, labels = batch.get("mask"), batch["label"]
    model_state = extra["model_state"]["student"]
    train_rng, heldout_rng = jax.random.split(rng)

    def student_logits(params, x, key):
      out, state = self.student({"params": params, **model_state}, x, train=True,
                                rngs={"dropout": key})
      return out.logits, state

    logits, new_state = student_logits(trainable["student"], batch["image"], train_rng)
    teacher_out, _ = self.teacher(jax.lax.stop_gradient(frozen["teacher"]), batch["image"],
                                  train=False)
    teacher_logits = jax.lax.stop_gradient(teacher_out.logits)
    class_sums = distiller.update_class_sums(extra[STATE], jax.nn.softmax(teacher_logits), labels, mask)
    alpha = self.fusion_ratio(trainable["fusion"],
                              relations(logits, teacher_logits, labels, distiller.class_means(class_sums)))
    fused, (ce, kd) = self.fused_loss(logits, teacher_logits, labels,
                                      jax.lax.stop_gradient(alpha), mask)

    # L_H(ω): the held-out loss of the student after a virtual step with α(ω); θ is stopped.
    params = jax.lax.stop_gradient(trainable["student"])
    inner = lambda p: self.fused_loss(student_logits(p, batch["image"], train_rng)[0],
                                      teacher_logits, labels, alpha, mask)[0]
    virtual = sgd_update(params, jax.grad(inner)(params), self.lookahead_lr)
    heldout_logits, _ = student_logits(virtual, batch[HELDOUT + "image"], heldout_rng)
    heldout = losses.masked_mean(cross_entropy(heldout_logits, batch[HELDOUT + "label"]),
                                 batch.get(HELDOUT + "mask"))

    correct = jnp.argmax(logits, -1) == hard_labels(labels)
    metrics = {"terms/ce": ce, "terms/kd": kd, "terms/fused": fused, "terms/heldout": heldout,
               "tgeo/alpha": losses.masked_mean(alpha, mask),
               "train/accuracy": losses.masked_mean(correct, mask)}
    new_extra = {**extra, "model_state": {"student": new_state}, STATE: class_sums}
    return fused + heldout, (metrics, new_extra)

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    del old
    return new


def stage(name: str, student: tuple[Callable, dict], teacher: tuple[Callable, dict], *,
          tx: optax.GradientTransformation, num_steps: int,
          fusion_tx: optax.GradientTransformation | None = None, metadata: dict | None = None,
          **method_kwargs) -> trainer.Stage:
  """A `trainer.Stage` training `TGeoKD` from `(apply_fn, variables)` pairs.

  `tx` trains the student and, unless `fusion_tx` is given, the fusion network;
  `method_kwargs` go to `TGeoKD` (`lookahead_lr` is required).
  """
  method = TGeoKD(student[0], teacher[0], **method_kwargs)
  metadata = {**(metadata or {}), "regime": "tgeo", "temperature": method.temperature,
              "fusion_hidden_sizes": list(method.fusion.hidden_sizes)}
  return trainer.Stage(name, method, {"student": student[1], "teacher": teacher[1]}, metadata,
                       tx, num_steps, part_tx={"fusion": fusion_tx} if fusion_tx else {})
