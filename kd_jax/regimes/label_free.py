"""Label-free self-distillation with an EMA teacher, DINO-style (a `kd_jax.step.Method`).

Every image x of the batch gets V ≥ 2 augmented views v_1..v_V (DSA, `kd_jax.data.dsa`, drawn
from the step's rng); labels are never read. A projection head g on a backbone tap (default
`pre_logits`) gives student outputs s_i = g_θ(f_θ(v_i)) and teacher outputs
t_i = g_θ'(f_θ'(v_i)), `[K]` each. The teacher's are centred and sharpened, the student's
softened:

    P_t,i = softmax((t_i − c)/τ_t),   P_s,j = softmax(s_j/τ_s),
    L = 1/(V(V−1)) Σ_{i≠j} H(P_t,i, P_s,j),   H(p, q) = −Σ_k p_k log q_k,

with the teacher under stop-gradient. After each loss the center follows the teacher's mean
output, c ← m_c·c + (1 − m_c)·mean_{i,b} t_{i,b}, and after each update the teacher is the EMA
of the student (backbone and head, `mean_teacher.ema_update`) with DINO's cosine momentum
m_s = 1 − (1 − m_0)(1 + cos(π·min(s, S)/S))/2 over S = `momentum_steps` updates (s the updates
done before this one), or the constant m_0.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(reference: facebookresearch/dino `main_dino.py`, `vision_transformer.py` `DINOHead`). Earlier
label-free teacher–student seeds: OBoW (Gidaris et al., CVPR 2021) and SiT (Atito et al., 2021).

Departures: no multi-crop (all V views are full-size "global" views, each teacher view paired
with every other student view), fixed teacher temperature (DINO warms it up from 0.04 to 0.07),
a smaller default head (DINO: K = 65536) whose last layer is trained from the first step (DINO
freezes it for the first epoch), and BatchNorm statistics of the backbone are averaged
into the teacher like its parameters. `linear_probe` is closed-form ridge regression on frozen
features instead of DINO's SGD-trained linear classifier.
"""
import functools
import math
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses, trainer
from kd_jax.data import dsa
from kd_jax.regimes.mean_teacher import ema_update
from kd_jax.step import TrainState

STATE = "label_free"


class ProjectionHead(nn.Module):
  """DINO's head: MLP (GELU) → bottleneck → L2-normalise → weight-normalised linear (norm 1,
  no bias) to `out_dim`. Input `[B, ...]` (flattened), output `[B, out_dim]`."""
  hidden_dim: int
  bottleneck_dim: int
  out_dim: int
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    dense = lambda size: nn.Dense(size, kernel_init=nn.initializers.truncated_normal(0.02))
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for _ in range(self.num_layers - 1):
      x = nn.gelu(dense(self.hidden_dim)(x), approximate=False)
    x = dense(self.bottleneck_dim)(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("last_layer", nn.initializers.lecun_normal(), (self.bottleneck_dim,
                                                                  self.out_dim))
    return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _init_head(head: ProjectionHead, rng: jax.Array, features: jax.Array) -> dict:
  return head.init(rng, features)


def cross_view_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, *,
                    student_temperature: float, teacher_temperature: float) -> jax.Array:
  """1/(V(V−1)) Σ_{i≠j} H(softmax((t_i − c)/τ_t), softmax(s_j/τ_s)) per example.

  Args:
    student, teacher: `[V, B, K]` head outputs of V ≥ 2 views (the teacher's are stopped).
    center: `[K]`.
  Returns:
    `[B]` float32.
  """
  views = student.shape[0]
  targets = jax.nn.softmax(jax.lax.stop_gradient((teacher - center) / teacher_temperature), -1)
  log_probs = jax.nn.log_softmax(student.astype(jnp.float32) / student_temperature, -1)
  ce = -jnp.einsum("ibk,jbk->ijb", targets, log_probs)
  return jnp.sum(ce * (1.0 - jnp.eye(views))[:, :, None], (0, 1)) / (views * (views - 1))


def update_center(center: jax.Array, teacher: jax.Array, mask: jax.Array | None,
                  momentum: float) -> jax.Array:
  """m·c + (1 − m)·(mean of the `[V, B, K]` teacher outputs over views and real rows)."""
  rows = jnp.ones(teacher.shape[1]) if mask is None else jnp.asarray(mask, jnp.float32)
  mean = jnp.einsum("vbk,b->k", jax.lax.stop_gradient(teacher), rows) / jnp.maximum(
      teacher.shape[0] * jnp.sum(rows), 1.0)
  return momentum * center + (1.0 - momentum) * mean


def teacher_momentum(step, momentum: float, momentum_steps: int | None) -> jax.Array:
  """DINO's cosine schedule from `momentum` at step 0 to 1 at `momentum_steps` (constant after);
  `momentum` throughout when `momentum_steps` is None."""
  if momentum_steps is None:
    return jnp.float32(momentum)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32), momentum_steps) / momentum_steps
  return 1.0 - (1.0 - momentum) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0


class LabelFree:
  """DINO-style self-distillation of a backbone (see the module docstring).

  Args:
    backbone: the apply function of the network pre-trained (its variables are "student").
    tap: the backbone feature the head reads (`ModelOutput.features[tap]`).
    out_dim, hidden_dim, bottleneck_dim, num_layers: the projection head (K = out_dim).
    student_temperature, teacher_temperature: τ_s and τ_t (DINO: 0.1, 0.04).
    center_momentum: m_c (DINO: 0.9).
    momentum, momentum_steps: the teacher's EMA momentum m_0 in [0, 1) and the length of its
      cosine increase to 1 (`None`: constant; DINO: 0.996 over the whole run).
    num_views: V ≥ 2.
    strategy, mode: the DSA augmentation of each view.
    view: the batch key of the images.

  State: `trainable = {"student": backbone params, "head": head params}`, `frozen =
  {"teacher": {"student": {"params", **model_state}, "head": {"params"}}}` (checkpointed),
  `extra = {"model_state": {"student": ...}, "label_free": {"center": [K]}}`.
  Metrics: `terms/label_free`, `train/teacher_entropy` (mean entropy of P_t; near 0 or near
  log K signals collapse).
  """

  evolving_frozen = ("teacher",)

  def __init__(self, backbone: Callable, *, tap: str = "pre_logits", out_dim: int = 4096,
               hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3,
               student_temperature: float = 0.1, teacher_temperature: float = 0.04,
               center_momentum: float = 0.9, momentum: float = 0.996,
               momentum_steps: int | None = None, num_views: int = 2,
               strategy: str = "color_crop_scale", mode: str = "all",
               view: str = "image"):
    checks = {"student_temperature": (student_temperature, student_temperature > 0, "> 0"),
              "teacher_temperature": (teacher_temperature, teacher_temperature > 0, "> 0"),
              "center_momentum": (center_momentum, 0 <= center_momentum <= 1, "in [0, 1]"),
              "momentum": (momentum, 0 <= momentum < 1, "in [0, 1)")}
    for field, (value, ok, requirement) in checks.items():
      if not (math.isfinite(value) and ok):
        raise ValueError(f"label_free: {field} must be {requirement}, got {value}")
    sizes = {"out_dim": out_dim, "hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim,
             "num_layers": num_layers, "num_views": num_views,
             **({} if momentum_steps is None else {"momentum_steps": momentum_steps})}
    for field, value in sizes.items():
      least = 2 if field == "num_views" else 1
      if not (isinstance(value, (int, np.integer)) and value >= least):
        raise ValueError(f"label_free: {field} must be an integer >= {least}, got {value!r}")
    dsa.parse_strategy(strategy)
    if mode not in dsa.MODES:
      raise ValueError(f"label_free: mode must be one of {dsa.MODES}, got {mode!r}")
    self.backbone, self.tap, self.view = backbone, tap, view
    self.head = ProjectionHead(hidden_dim, bottleneck_dim, out_dim, num_layers)
    self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
    self.center_momentum, self.momentum, self.momentum_steps = (center_momentum, momentum,
                                                                momentum_steps)
    self.num_views, self.strategy, self.mode = num_views, strategy, mode

  def views(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """`[V, B, H, W, C]`: V augmentations of `[B, H, W, C]` images, one key each."""
    return jnp.stack([dsa.diff_augment(images, key, strategy=self.strategy, mode=self.mode)
                      for key in jax.random.split(rng, self.num_views)])

  def _features(self, variables, images, **kwargs):
    out, model_state = self.backbone(variables, images, **kwargs)
    if self.tap not in out.features:
      raise ValueError(f"label_free: the backbone has no tap {self.tap!r}; it has "
                       f"{sorted(out.features)}")
    return out.features[self.tap], model_state

  def init(self, rng: jax.Array, variables: Mapping[str, dict], batch) -> tuple:
    """`variables = {"student": {"params", **model_state}}` → (trainable, frozen, extra); the
    head is initialised from `rng` and the teacher starts as a copy of the student."""
    if "student" not in variables:
      raise ValueError(f"label_free: no variables for 'student' (given: {sorted(variables)})")
    if self.view not in batch:
      raise ValueError(f"label_free: the batch has no view {self.view!r} (it has {sorted(batch)})")
    backbone = variables["student"]
    features = jax.eval_shape(lambda v, x: self._features(v, x, train=False)[0], backbone,
                              batch[self.view])
    head = _init_head(self.head, rng, jnp.zeros(features.shape, features.dtype))["params"]
    teacher = jax.tree.map(jnp.array, {"student": backbone, "head": {"params": head}})
    extra = {"model_state": {"student": {k: v for k, v in backbone.items() if k != "params"}},
             STATE: {"center": jnp.zeros(self.head.out_dim, jnp.float32)}}
    return {"student": backbone["params"], "head": head}, {"teacher": teacher}, extra

  def loss(self, trainable, frozen, extra, batch, step, rng):
    """The cross-view loss of the student against the centred teacher; see
    `kd_jax.step.Method.loss`."""
    del step
    view_key, dropout_key = jax.random.split(rng)
    views = self.views(batch[self.view], view_key)
    flat = views.reshape(-1, *views.shape[2:])
    shape = (self.num_views, views.shape[1], self.head.out_dim)
    features, model_state = self._features(
        {"params": trainable["student"], **extra["model_state"]["student"]}, flat, train=True,
        rngs={"dropout": dropout_key})
    student = self.head.apply({"params": trainable["head"]}, features).reshape(shape)
    teacher_vars = jax.lax.stop_gradient(frozen["teacher"])
    teacher_features, _ = self._features(teacher_vars["student"], flat, train=False)
    teacher = jax.lax.stop_gradient(
        self.head.apply(teacher_vars["head"], teacher_features).reshape(shape))
    center, mask = extra[STATE]["center"], batch.get("mask")
    loss = losses.masked_mean(cross_view_loss(
        student, teacher, center, student_temperature=self.student_temperature,
        teacher_temperature=self.teacher_temperature), mask)
    log_targets = jax.nn.log_softmax((teacher - center) / self.teacher_temperature, -1)
    entropy = -jnp.sum(jnp.exp(log_targets) * log_targets, -1)  # [V, B]
    metrics = {f"terms/{STATE}": loss,
               "train/teacher_entropy": losses.masked_mean(jnp.mean(entropy, 0), mask)}
    new_extra = {**extra, "model_state": {**extra["model_state"], "student": model_state},
                 STATE: {"center": update_center(center, teacher, mask, self.center_momentum)}}
    return loss, (metrics, new_extra)

  def after_update(self, old: TrainState, new: TrainState) -> TrainState:
    """The teacher's EMA step (backbone, its model state and head) towards the student."""
    student = {"student": {"params": new.trainable["student"],
                           **new.extra["model_state"]["student"]},
               "head": {"params": new.trainable["head"]}}
    momentum = teacher_momentum(old.step, self.momentum, self.momentum_steps)
    return new.replace(frozen={**new.frozen, "teacher": ema_update(new.frozen["teacher"],
                                                                   student, momentum)})


def teacher_backbone(state: TrainState) -> dict:
  """`{"params", **model_state}` of the teacher's backbone (DINO evaluates the teacher)."""
  return state.frozen["teacher"]["student"]


def stage(name: str, backbone: tuple[Callable, dict], *, tx: optax.GradientTransformation,
          num_steps: int, metadata: dict | None = None, **method_kwargs) -> trainer.Stage:
  """A `trainer.Stage` pre-training a backbone `(apply_fn, variables)` with `LabelFree`.

  `method_kwargs` go to `LabelFree`; the checkpoint metadata records the tap and the head size.
  """
  method = LabelFree(backbone[0], **method_kwargs)
  metadata = {**(metadata or {}), "regime": "label_free", "tap": method.tap,
              "out_dim": method.head.out_dim}
  return trainer.Stage(name, method, {"student": backbone[1]}, metadata, tx, num_steps)


def linear_probe(features_fn: Callable[[jax.Array], jax.Array],
                 train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
                 l2: float = 1e-3, batch_size: int = 512) -> float:
  """Test accuracy of a linear classifier fitted on frozen features.

  Ridge regression of one-hot labels on the standardised features plus a bias, in closed form
  (float64, deterministic): W = (XᵀX + l2·N·I')⁻¹XᵀY, I' not penalising the bias; the class is
  argmax XW. Compare a pre-trained backbone's probe with a random-init one's.

  Args:
    features_fn: `[n, H, W, C] images -> [n, ...] features` (flattened), e.g.
      `jax.jit(lambda x: apply_fn(variables, x, train=False)[0].features["pre_logits"])`.
    train, test: `(images, [N] integer labels)`.
    l2: the ridge penalty per example, > 0 (so dead features do not make XᵀX singular).
    batch_size: images per `features_fn` call.
  Returns:
    The fraction of `test` classified correctly.
  """
  if not (math.isfinite(l2) and l2 > 0):
    raise ValueError(f"linear_probe: l2 must be > 0, got {l2}")

  def embed(images):
    chunks = [np.asarray(features_fn(images[i:i + batch_size]), np.float64)
              for i in range(0, len(images), batch_size)]
    return np.concatenate([c.reshape(c.shape[0], -1) for c in chunks])

  x_train, x_test = embed(train[0]), embed(test[0])
  mean, std = x_train.mean(0), x_train.std(0) + 1e-8
  x_train, x_test = ((np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=1.0))
                     for x in (x_train, x_test))
  y_train = np.asarray(train[1])
  targets = np.eye(int(max(y_train.max(), np.max(test[1]))) + 1)[y_train]
  penalty = np.diag(np.r_[np.full(x_train.shape[1] - 1, l2 * len(x_train)), 0.0])
  weights = np.linalg.solve(x_train.T @ x_train + penalty, x_train.T @ targets)
  return float(np.mean(np.argmax(x_test @ weights, -1) == np.asarray(test[1])))
