"""INFER: universal feature compensators added to real base images of every class.

Zhang, Du, Liu, Zhou, "Breaking Class Barriers: Efficient Dataset Distillation via Inter-Class
Feature Compensator" (ICLR 2025); reference `zhangxin-xd/UFC`: `ufc_generation/ufc_cifar.py`,
`ufc_generation/utils.py`, `sh/ufc_cifar.sh`, static labels in `ufc_validation/val_static.py`.

Base sets: K sets P_k of real images, one random image per class (`select_real`),
`[K, C, H, W, ch]`.
Compensators: M per base set, u_km `[H, W, ch]`, zero-initialised, each shared by all C images
of its set ("one instance for ALL classes"). Each (k, m) is one SRe2L batch (`recovery.py`):

  L_km = mean_c CE(teacher(jitter(P_kc + u_km)), c) + r_bn · R_BN(jitter(P_k + u_km)),

Adam (0.5, 0.9) with the cosine lr decay, the loss summed over (k, m). The synthetic set is every
base image plus every P_kc + u_km (clipped to the valid range, as the reference's saved images):
K·(M+1) images per class, from K·C + K·M stored images.

IPC budget (the reference's `ipc_init = int(ipc / (M / C + 1))`): the stored images must not
exceed ipc·C, so K = ⌊ipc·C / (C + M)⌋ base sets (integer arithmetic; the reference's float
division rounds some exact quotients down, e.g. ipc 33, C 10, M 1: 29 instead of 30), and the
stored image floats are K·(C + M)·H·W·ch ≤ ipc·C·H·W·ch. E.g. CIFAR-100, ipc 10, M 4: K = 9,
936 stored images (of 1000 allowed), 4500 training images.

Labels (`labels`): "teacher" (the reference's static labeling: the teacher's softmax on each
final image, computed once; the reference averages the logits of its M teachers and trains the
student with a temperature-30 KL and mixup, which belongs to the evaluation) → label_kind "probs",
and the S·C label floats count in `stored_floats` (they could be recomputed from the teacher);
or "hard" (class ids of the base image) → stored floats are exactly base images + compensators.

Departures: the reference optimises the M compensators of a base set against M different
architectures (ResNet-18, MobileNetV2, EfficientNet-B0, ShuffleNet); the context has one
teacher, so all M use it and differ only through their jitter draws — set M = 1 to spend the
budget on more base sets instead. All (k, m) batches are optimised together (see `recovery.py`).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data.pipeline import pad_rows
from kd_jax.dataset_distill.method import Context, DistilledSet, Start, Step, iteration_rng
from kd_jax.dataset_distill.recovery import (augment_groups, draw_augment, pixel_range,
                                             recovery_losses, recovery_optimizer,
                                             require_bn_teacher)
from kd_jax.dataset_distill.synthetic import select_real

LABELS = ("teacher", "hard")
_LABEL_BATCH = 512


def infer_budget(ipc: int, num_classes: int, compensators_per_base: int) -> int:
  """K, the number of base sets: ⌊ipc·C / (C + M)⌋ (K·C base images + K·M compensators ≤ ipc·C)."""
  return ipc * num_classes // (num_classes + compensators_per_base)


@dataclasses.dataclass
class INFER:
  """INFER (module docstring). Defaults: `sh/ufc_cifar.sh` (CIFAR-100) and `ufc_cifar.py`.

  Attributes:
    iterations: Adam steps (1000).
    compensators_per_base: M, compensators per base set (4, the reference's architectures).
    lr, betas, eps: Adam's peak lr (cosine-decayed to 0), betas and eps (0.25, (0.5, 0.9), 1e-8).
    r_bn: weight of R_BN (1 for CIFAR; 0.01 for ImageNet).
    first_bn_multiplier: extra weight of the first BatchNorm (10).
    jitter: roll offsets in [0, jitter] pixels (4).
    labels: "teacher" (static soft labels, the reference) or "hard".
  """
  uses_teacher = True  # the job trains the teacher (a class attribute, not a field)
  name: str = "infer"
  iterations: int = 1000
  compensators_per_base: int = 4
  lr: float = 0.25
  betas: tuple[float, float] = (0.5, 0.9)
  eps: float = 1e-8
  r_bn: float = 1.0
  first_bn_multiplier: float = 10.0
  jitter: int = 4
  labels: str = "teacher"

  def prepare(self, context: Context) -> None:
    teacher = require_bn_teacher(context)
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
    num_classes, m = context.num_classes, self.compensators_per_base
    k = infer_budget(context.ipc, num_classes, m)
    if k < 1 or m < 1:
      raise ValueError(f"INFER with infer.compensators_per_base={m} needs distill.ipc·C >= "
                       f"C + {m} (one base image per class and its compensators), got "
                       f"distill.ipc={context.ipc}, C={num_classes}; raise distill.ipc or "
                       "lower infer.compensators_per_base (>= 1)")
    self.num_bases = k
    idx = select_real(np.random.default_rng(context.seed), np.asarray(context.train_labels), num_classes, k)
    base = np.asarray(context.train_images, np.float32)[idx]                 # [C·K, ...], c·K + k
    self._base = jnp.asarray(base.reshape(num_classes, k, *base.shape[1:]).swapaxes(0, 1))
    self._range = pixel_range(context.train_images)
    self._context = context
    labels = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), (k * m, 1))  # [K·M, C]

    def objective(compensators, base, draws):
      x = base[:, None] + compensators[:, :, None]                           # [K, M, C, H, W, ch]
      x = x.reshape(k * m, *x.shape[2:])
      losses, ce, bn = recovery_losses(teacher, augment_groups(x, draws), labels,
                                       r_bn=self.r_bn, first_bn_multiplier=self.first_bn_multiplier)
      return losses.sum(), (ce.mean(), bn.mean())

    self._value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
    self._logits = jax.jit(lambda x: teacher.apply_fn(teacher.variables, x, train=False)[0].logits)

  def start(self, context: Context) -> Start:
    shape = (self.num_bases, self.compensators_per_base, *context.train_images.shape[1:])
    tx = recovery_optimizer(self.lr, self.iterations, self.betas, self.eps, clip=None)
    return Start(values={"compensators": jnp.zeros(shape, jnp.float32)},
                 optimizers={"compensators": tx})

  def draws(self, iteration: int) -> dict:
    """Iteration `iteration`'s jitter offsets `[K·M, 2]` (a function of (seed, iteration))."""
    c = self._context
    groups = self.num_bases * self.compensators_per_base
    return draw_augment(iteration_rng(c.seed, iteration), groups, c.train_images.shape[1:3],
                        augment="jitter", jitter=self.jitter)

  def value_and_grad(self, values: dict, state: Any, iteration: int) -> Step:
    (loss, (ce, bn)), grad = self._value_and_grad(values["compensators"], self._base,
                                                  self.draws(iteration))
    return Step(loss=loss, grads={"compensators": grad}, state=state,
                metrics={"ce": float(ce), "bn": float(bn)})

  def expanded_images(self, compensators) -> np.ndarray:
    """`[C·K·(M+1), H, W, ch]` in class order; class c's: P_kc for k < K, then
    clip(P_kc + u_km) for (k, m) in row-major order."""
    base = np.asarray(self._base)
    k, num_classes = base.shape[:2]
    low, high = self._range
    synth = np.clip(base[:, None] + np.asarray(compensators)[:, :, None], low, high)
    synth = synth.reshape(-1, num_classes, *base.shape[2:])                  # [K·M, C, ...]
    per_class = np.concatenate([base, synth]).swapaxes(0, 1)                 # [C, K(M+1), ...]
    return per_class.reshape(-1, *base.shape[2:]).astype(np.float32)

  def distilled(self, values: dict) -> DistilledSet:
    compensators = values["compensators"]
    images = self.expanded_images(compensators)
    per_class = self.num_bases * (self.compensators_per_base + 1)
    ids = np.repeat(np.arange(self._context.num_classes), per_class).astype(np.int32)
    floats = int(self._base.size + np.size(compensators))
    if self.labels == "hard":
      return DistilledSet(images=images, labels=ids, label_kind="hard", lr=None,
                          stored_floats=floats)
    chunks = [images[s:s + _LABEL_BATCH] for s in range(0, len(images), _LABEL_BATCH)]
    logits = np.concatenate([np.asarray(self._logits(pad_rows(x, _LABEL_BATCH)))[:len(x)]
                             for x in chunks])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1), np.float32)
    return DistilledSet(images=images, labels=probs, label_kind="probs", lr=None,
                        stored_floats=floats + int(probs.size))
