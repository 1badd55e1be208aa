"""Semi-supervised mean teacher with confidence-thresholded pseudo-labels (a `kd_jax.step.Method`).

Each batch holds B labeled rows (`image`, `label`, `mask`) and U unlabeled images
(`unlabeled_image`, `[U, H, W, C]`); nothing else about the unlabeled rows is ever in the batch
(`semi_supervised_batches` builds their source without labels, and the method refuses a batch
with any other `unlabeled_*` key but `unlabeled_index`). Inside the step the rng makes a weak
and a strong view of the unlabeled images with DSA (`kd_jax.data.dsa.diff_augment`). The
teacher θ' is an exponential moving average of the student θ:

    θ'_t = m_t·θ'_{t−1} + (1 − m_t)·θ_t,   m_t = min(decay, 1 − (1 + w)/(t + 1 + w)),

t the updates done (1 after the first), w = `momentum_warmup`. w = 0 is Tarvainen's
`min(1 − 1/(global_step + 1), α)`; w = 100 is Soft Teacher's warm-up (its hook's
`min(momentum, 1 − (1 + warm_up)/(iter + 1 + warm_up))` before iteration `iter = t`). The
teacher starts as a copy of the student and holds BatchNorm statistics averaged the same way.

The teacher (eval mode) predicts p = softmax(t(weak)); c = max p is its confidence and
ŷ = argmax p the hard pseudo-label. The student sees the labeled images and the strong view in
one forward pass, and minimises

    L = CE(s(x), y) + λ(t)·Σ_u w_u·CE(s(strong_u), ŷ_u) / N,   λ(t) = λ·exp(−5(1 − t/T)²)

(the sigmoid ramp-up of Laine & Aila / Tarvainen over T = `rampup_steps`, t clipped to T), with
per-example weights (`pseudo_label_weights`):

- FixMatch's hard threshold τ: w = 1 if c ≥ τ else 0, N = U (Sohn et al., NeurIPS 2020);
- HSSDA's dual thresholds τ_l < τ (Liu et al., "Hierarchical Supervision and Shuffle Data
  Augmentation for 3D Semi-Supervised Object Detection", CVPR 2023): c ≥ τ is a hard pseudo-label
  (w = 1); τ_l ≤ c < τ is an ambiguous one kept with the teacher's score as its loss weight
  (w = c, as `select_mid_weight` in azhuantou/HSSDA `voxel_rcnn_ssl.py`); c < τ_l is dropped;
- Soft Teacher's score weighting (Xu et al., "End-to-End Semi-Supervised Object Detection with
  Soft Teacher", ICCV 2021): every kept example is weighted by c and the sum is normalised by
  N = max(Σ_u w_u, 1), as its `unsup_rcnn_cls_loss`.

Mean teacher: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017
(reference: CuriousAI/mean-teacher `pytorch/main.py`).

Departures: Tarvainen's consistency is the MSE between the two softmax outputs on every
unlabeled example, without thresholds, and his teacher runs in train mode with its own
BatchNorm statistics; here the consistency is FixMatch-style hard pseudo-labels from an eval-mode
teacher whose statistics are averaged. HSSDA's thresholds are per class and adapted from the
labeled data, and it also removes the points of low-score boxes; here τ_l, τ are fixed and
shared. Soft Teacher's score weighting is for background proposals of a detector; here it
weights every pseudo-labelled image. Views are DSA transforms, not RandAugment.
"""
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import data, losses, trainer
from kd_jax.data import dsa
from kd_jax.step import TrainState, cross_entropy, hard_labels

UNLABELED = "unlabeled_image"
UNLABELED_KEYS = (UNLABELED, "unlabeled_index")  # everything a batch may say of unlabeled rows


def ema_momentum(step, decay: float, warmup: float = 0.0) -> jax.Array:
  """m_t = min(decay, 1 − (1 + warmup)/(t + 1 + warmup)) for `step` = t updates done."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, 1.0 - (1.0 + warmup) / (step + 1.0 + warmup))


def ema_update(teacher, student, momentum):
  """m·teacher + (1 − m)·student, leaf by leaf (same tree structure), in the teacher's dtypes."""
  return jax.tree.map(lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype),
                      teacher, student)


def sigmoid_rampup(step, rampup_steps: int) -> jax.Array:
  """exp(−5(1 − t/T)²) with t = min(step, T); 1 when T = 0 (Laine & Aila, ICLR 2017)."""
  if rampup_steps == 0:
    return jnp.float32(1.0)
  t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, rampup_steps)
  return jnp.exp(-5.0 * (1.0 - t / rampup_steps)**2)


def pseudo_label_weights(confidence: jax.Array, *, threshold: float,
                         low_threshold: float | None = None,
                         score_weighting: bool = False) -> jax.Array:
  """`[U]` loss weight of each hard pseudo-label from the teacher's `[U]` confidence.

  c ≥ threshold: 1 (c with `score_weighting`); low_threshold ≤ c < threshold: c; else 0.
  """
  confident = confidence >= threshold
  weight = jnp.where(confident, confidence if score_weighting else 1.0, 0.0)
  if low_threshold is not None:
    weight = jnp.where(~confident & (confidence >= low_threshold), confidence, weight)
  return weight


def pseudo_label_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, threshold: float,
                      low_threshold: float | None = None,
                      score_weighting: bool = False) -> tuple[jax.Array, jax.Array]:
  """Σ_u w_u·CE(s_u, argmax t_u) / N (see the module docstring) and the teacher's confidence.

  Args:
    student_logits: `[U, C]` on the strong view.
    teacher_logits: `[U, C]` on the weak view (stopped).
  Returns:
    (scalar loss, `[U]` confidence c = max softmax(t)).
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  confidence = jnp.max(probs, -1)
  weights = pseudo_label_weights(confidence, threshold=threshold, low_threshold=low_threshold,
                                 score_weighting=score_weighting)
  ce = cross_entropy(student_logits, jnp.argmax(probs, -1))
  norm = jnp.maximum(jnp.sum(weights), 1.0) if score_weighting else ce.shape[0]
  return jnp.sum(weights * ce) / norm, confidence


def _check_batch(batch) -> None:
  leaked = sorted(k for k in batch if k.startswith("unlabeled_") and k not in UNLABELED_KEYS)
  if leaked:
    raise ValueError(f"mean_teacher: the batch carries {leaked}; unlabeled rows may hold only "
                     f"{list(UNLABELED_KEYS)} (their labels must never reach the step)")
  missing = [k for k in ("image", "label", UNLABELED) if k not in batch]
  if missing:
    raise ValueError(f"mean_teacher: the batch has no {missing} (it has {sorted(batch)}); "
                     "build it with mean_teacher.semi_supervised_batches")


class MeanTeacher:
  """A student trained on labeled rows and on its EMA teacher's pseudo-labels (module doc).

  Args:
    student: the student's apply function; the teacher is the same network.
    decay: the final EMA momentum, in [0, 1).
    momentum_warmup: w of the momentum ramp (0: Tarvainen; 100: Soft Teacher).
    threshold: τ, the confidence of a hard pseudo-label (FixMatch uses 0.95).
    low_threshold: τ_l < τ of HSSDA's ambiguous band (`None`: a single threshold).
    score_weighting: Soft Teacher's weighting of each pseudo-label by the teacher's confidence.
    unlabeled_weight: λ, the final weight of the unlabeled term.
    rampup_steps: T of λ's sigmoid ramp-up (0: no ramp-up).
    weak_strategy, strong_strategy: DSA strategies of the teacher's and the student's views of
      the unlabeled images (`None`: no augmentation); the weak one applies one family at a time,
      the strong one all of them in order (`strong_mode`).

  State: `trainable = {"student": params}`, `frozen = {"teacher": {"params", **model_state}}`
  (checkpointed: it is in `evolving_frozen`), `extra = {"model_state": {"student": ...}}`.
  Metrics: `terms/supervised`, `terms/unsupervised`, `train/unlabeled_weight`,
  `train/pseudo_label_fraction` (c ≥ τ), with `low_threshold` `train/ambiguous_fraction`
  (τ_l ≤ c < τ), and `train/accuracy` on the labeled rows. No metric reads unlabeled labels.
  """

  evolving_frozen = ("teacher",)

  def __init__(self, student: Callable, *, decay: float = 0.999, momentum_warmup: float = 0.0,
               threshold: float = 0.95, low_threshold: float | None = None,
               score_weighting: bool = False, unlabeled_weight: float = 1.0,
               rampup_steps: int = 0, weak_strategy: str | None = "crop",
               strong_strategy: str | None = "color_crop_cutout", strong_mode: str = "all"):
    checks = {"decay": (decay, 0 <= decay < 1, "in [0, 1)"),
              "momentum_warmup": (momentum_warmup, momentum_warmup >= 0, ">= 0"),
              "threshold": (threshold, 0 <= threshold <= 1, "in [0, 1]"),
              "unlabeled_weight": (unlabeled_weight, unlabeled_weight >= 0, ">= 0"),
              "rampup_steps": (rampup_steps, isinstance(rampup_steps, (int, np.integer)) and
                               rampup_steps >= 0, "an integer >= 0")}
    if low_threshold is not None:
      checks["low_threshold"] = (low_threshold, 0 <= low_threshold < threshold,
                                 f"in [0, threshold={threshold})")
    for field, (value, ok, requirement) in checks.items():
      if not (math.isfinite(value) and ok):
        raise ValueError(f"mean_teacher: {field} must be {requirement}, got {value}")
    for strategy in (weak_strategy, strong_strategy):
      if strategy is not None:
        dsa.parse_strategy(strategy)
    if strong_mode not in dsa.MODES:
      raise ValueError(f"mean_teacher: strong_mode must be one of {dsa.MODES}, got {strong_mode!r}")
    self.student, self.decay, self.momentum_warmup = student, decay, momentum_warmup
    self.threshold, self.low_threshold, self.score_weighting = (threshold, low_threshold,
                                                                score_weighting)
    self.unlabeled_weight, self.rampup_steps = unlabeled_weight, int(rampup_steps)
    self.views = ((weak_strategy, "single"), (strong_strategy, strong_mode))

  def augment(self, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The weak and the strong view of `[U, H, W, C]` unlabeled images."""
    return tuple(images if strategy is None else
                 dsa.diff_augment(images, key, strategy=strategy, mode=mode)
                 for key, (strategy, mode) in zip(jax.random.split(rng), self.views))

  def init(self, rng: jax.Array, variables: dict, batch) -> tuple:
    """`variables = {"student": {"params", **model_state}}` → (trainable, frozen, extra); the
    teacher starts as a copy of the student."""
    del rng
    if "student" not in variables:
      raise ValueError(f"mean_teacher: no variables for 'student' (given: {sorted(variables)})")
    _check_batch(batch)
    student = variables["student"]
    model_state = {k: v for k, v in student.items() if k != "params"}
    return ({"student": student["params"]}, {"teacher": jax.tree.map(jnp.array, student)},
            {"model_state": {"student": model_state}})

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """Supervised CE + λ(t)·pseudo-label CE; see `kd_jax.step.Method.loss`."""
    _check_batch(batch)
    view_key, dropout_key = jax.random.split(rng)
    weak, strong = self.augment(batch[UNLABELED], view_key)
    teacher_out, _ = self.student(jax.lax.stop_gradient(frozen["teacher"]), weak, train=False)
    n = batch["image"].shape[0]
    out, model_state = self.student(
        {"params": trainable["student"], **extra["model_state"]["student"]},
        jnp.concatenate([batch["image"], strong]), train=True, rngs={"dropout": dropout_key})
    mask = batch.get("mask")
    supervised = losses.masked_mean(cross_entropy(out.logits[:n], batch["label"]), mask)
    unsupervised, confidence = pseudo_label_loss(
        out.logits[n:], teacher_out.logits, threshold=self.threshold,
        low_threshold=self.low_threshold, score_weighting=self.score_weighting)
    weight = self.unlabeled_weight * sigmoid_rampup(step, self.rampup_steps)
    metrics = {"terms/supervised": supervised, "terms/unsupervised": unsupervised,
               "train/unlabeled_weight": weight,
               "train/pseudo_label_fraction": jnp.mean(confidence >= self.threshold),
               "train/accuracy": losses.masked_mean(
                   jnp.argmax(out.logits[:n], -1) == hard_labels(batch["label"]), mask)}
    if self.low_threshold is not None:
      metrics["train/ambiguous_fraction"] = jnp.mean(
          (confidence >= self.low_threshold) & (confidence < self.threshold))
    return supervised + weight * unsupervised, (
        metrics, {**extra, "model_state": {**extra["model_state"], "student": model_state}})

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    """The teacher's EMA step towards the updated student (params and model state)."""
    del old
    student = {"params": new.trainable["student"], **new.extra["model_state"]["student"]}
    teacher = ema_update(new.frozen["teacher"], student,
                         ema_momentum(new.step, self.decay, self.momentum_warmup))
    return new.replace(frozen={**new.frozen, "teacher": teacher})


def teacher_variables(state: TrainState) -> dict:
  """`{"params", **model_state}` of the EMA teacher in `state` (evaluate it like the student)."""
  return state.frozen["teacher"]


def stage(name: str, student: tuple[Callable, dict], *, tx: optax.GradientTransformation,
          num_steps: int, metadata: dict | None = None, **method_kwargs) -> trainer.Stage:
  """A `trainer.Stage` training `MeanTeacher` from the student's `(apply_fn, variables)`; train it
  on `semi_supervised_batches(...)`.

  `method_kwargs` go to `MeanTeacher`; the checkpoint metadata records the EMA and the
  thresholds, so a resume with other ones fails by name.
  """
  method = MeanTeacher(student[0], **method_kwargs)
  metadata = {**(metadata or {}), "regime": "mean_teacher", "decay": method.decay,
              "threshold": method.threshold, "low_threshold": method.low_threshold,
              "score_weighting": method.score_weighting}
  return trainer.Stage(name, method, {"student": student[1]}, metadata, tx, num_steps)


def split_labeled(labels: np.ndarray, labeled_fraction: float, *,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`(labeled, unlabeled)`: sorted, disjoint positions covering `0..N−1`; the labeled part is
  `kd_jax.data.stratified_fraction(labels, labeled_fraction, seed)` (per class
  max(1, round(f·n_c)) examples), the rest is unlabeled."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"mean_teacher: labels must be [N] integer class ids, got {labels.dtype} "
                     f"{labels.shape}")
  if not (math.isfinite(labeled_fraction) and 0 < labeled_fraction <= 1):
    raise ValueError(f"mean_teacher: labeled_fraction must be in (0, 1], got {labeled_fraction}")
  labeled = data.stratified_fraction(labels, labeled_fraction, seed)
  return labeled, np.setdiff1d(np.arange(labels.shape[0]), labeled)


def semi_supervised_batches(images: np.ndarray, labels: np.ndarray, *, labeled_fraction: float,
                            batch_size: int, unlabeled_batch_size: int, seed: int,
                            augment: data.AugmentConfig = data.AugmentConfig(), mean=None,
                            std=None, process_index: int = 0, process_count: int = 1,
                            prefetch: int = 2) -> Callable[[int], Iterator[dict]]:
  """`start_step -> iterator` of batches for `MeanTeacher` from one labeled set.

  The set is split by `split_labeled(labels, labeled_fraction, seed=seed)`. The labeled part
  feeds `kd_jax.data.train_batches` (seed `seed`); the unlabeled part's images, without their
  labels, feed another (seed `seed + 1`). Both are deterministic in the step, so a resumed run
  sees the batches of an uninterrupted one.

  Args:
    images: `[N, H, W, C]` (e.g. `kd_jax.data.load_arrays`).
    labels: `[N]` integer class ids.
    batch_size, unlabeled_batch_size: global B and U.
    Others: as `kd_jax.data.train_batches` (the same augmentation for both parts).
  Yields:
    `{"image", "label", "mask", "index", "unlabeled_image", "unlabeled_index"}`: the labeled
    batch of `train_batches` with `index` the rows' positions in `images`, the unlabeled images
    `[u, H, W, C]` and their positions in `images`.
  """
  labeled, unlabeled = split_labeled(labels, labeled_fraction, seed=seed)
  if unlabeled.size < unlabeled_batch_size:
    raise ValueError(f"mean_teacher: labeled_fraction={labeled_fraction} leaves {unlabeled.size} "
                     f"unlabeled images, fewer than unlabeled_batch_size={unlabeled_batch_size}")
  images = np.asarray(images)
  sources = (data.ArrayDataSource(images[labeled], np.asarray(labels)[labeled]),
             data.ArrayDataSource(images[unlabeled], np.zeros(unlabeled.size, np.int32)))
  options = dict(augment=augment, mean=mean, std=std, process_index=process_index,
                 process_count=process_count, prefetch=prefetch)

  def start(step: int) -> Iterator[dict]:
    labeled_it = data.train_batches(sources[0], batch_size=batch_size, seed=seed,
                                    start_step=step, **options)
    unlabeled_it = data.train_batches(sources[1], batch_size=unlabeled_batch_size,
                                      seed=seed + 1, start_step=step, **options)
    for batch, rest in zip(labeled_it, unlabeled_it):
      yield {**batch, "index": labeled[batch["index"]].astype(np.int32),
             UNLABELED: rest["image"], "unlabeled_index": unlabeled[rest["index"]].astype(np.int32)}

  return start
