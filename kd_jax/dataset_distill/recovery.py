"""SRe2L's recover stage: synthesise images from a BatchNorm teacher's statistics.

Yin, Xing, Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A New
Perspective" (NeurIPS 2023); reference `SRe2L/recover/data_synthesis.py` (ImageNet) and
`SRe2L/*small_dataset/recover_cifar.py` (CIFAR, the defaults here), `recover/utils.py`.

Images `x` start as N(0, 1) noise and minimise, per batch b (one image of every class),

  L_b = CE(teacher(aug(x_b)), y_b) + r_bn · Σ_l w_l (‖μ_l(x_b) − μ̂_l‖₂ + ‖σ²_l(x_b) − σ̂²_l‖₂),

μ_l, σ²_l the mean and biased variance over (N, H, W) of the input of BatchNorm layer l (in call
order), μ̂_l, σ̂²_l its running statistics, w_1 = `first_bn_multiplier`, w_l = 1 for l > 1. The
teacher runs in eval mode, so its statistics never change. Adam (betas (0.5, 0.9), eps 1e-8)
with a cosine lr decay to 0 over the iterations, then each pixel is clipped to the valid range.

The shared pieces (`bn_inputs`, `bn_statistics_loss`, `recovery_losses`, the augmentations and the
optimizer) are used by INFER (`feature_compensator.py`) and RDED (`patch_selection.py`).

Departures from the reference:
  * all `ipc` batches are optimised together (the loss is the sum of the per-batch losses; Adam is
    per element and each batch's BN statistics are its own, so each batch follows the update it
    would get alone) instead of one run per ipc index; each batch draws its own augmentation;
  * the valid pixel range is the per-channel min/max of `context.train_images` (the reference
    clips channel c to [−mean_c / std_c, (1 − mean_c) / std_c], the image of [0, 1]);
  * images are kept in float32 (the reference saves 8-bit JPEGs);
  * a BN loss term whose difference is exactly 0 has gradient 0 (torch's norm does the same).
"""
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.dataset_distill.method import (Context, DistilledSet, Start, Step, hard_label_set,
                                           iteration_rng)
from kd_jax.losses.features import safe_norm
from kd_jax.step import cross_entropy

AUGMENTS = ("jitter", "crop")


def require_bn_teacher(context: Context):
  """The teacher, checked to have BatchNorm running statistics."""
  teacher = context.teacher
  if teacher is None or "batch_stats" not in teacher.variables:
    raise ValueError("this method needs a BatchNorm teacher (context.teacher with "
                     "variables['batch_stats'])")
  return teacher


def pixel_range(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (min, max) `[C]` of `images` `[N, H, W, C]`: the valid (normalised) range."""
  images = np.asarray(images)
  axes = tuple(range(images.ndim - 1))
  return images.min(axes).astype(np.float32), images.max(axes).astype(np.float32)


# --- BatchNorm statistics -------------------------------------------------------------------

def bn_inputs(apply_fn: Callable, variables: dict, images: jax.Array):
  """Runs `apply_fn(variables, images, train=False)` and records every `nn.BatchNorm` input.

  Returns:
    (ModelOutput, `[(module path, input [B, ..., F])]` in call order).
  """
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      x = args[0] if args else kwargs["x"]
      captured.append((tuple(context.module.path), x))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out, _ = apply_fn(variables, images, train=False)
  return out, captured


def _running_stats(batch_stats: dict, path: tuple) -> tuple[jax.Array, jax.Array]:
  node = batch_stats
  for name in path:
    node = node[name]
  return node["mean"], node["var"]


def bn_statistics_loss(captured: list, batch_stats: dict, *, first_bn_multiplier: float = 10.0,
                       groups: int = 1) -> jax.Array:
  """SRe2L's R_BN per group: Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) (`recover/utils.py`,
  `BNFeatureHook`).

  Args:
    captured: `bn_inputs`' list; each input `[B, ..., F]` holds `groups` consecutive batches of
      B / groups images, whose statistics are taken separately (over all axes but F).
    batch_stats: the teacher's running statistics, looked up by each input's module path.
    first_bn_multiplier: w_1 (the first BatchNorm called); w_l = 1 for the others.
  Returns:
    `[groups]` float32.
  """
  if not captured:
    raise ValueError("the teacher called no nn.BatchNorm: R_BN needs a BatchNorm network")
  total = jnp.zeros((groups,), jnp.float32)
  for l, (path, x) in enumerate(captured):
    mean_r, var_r = _running_stats(batch_stats, path)
    x = x.astype(jnp.float32).reshape(groups, -1, x.shape[-1])
    mean = x.mean(1)
    var = jnp.square(x - mean[:, None]).mean(1)
    r = safe_norm(var - var_r.astype(jnp.float32)) + safe_norm(mean - mean_r.astype(jnp.float32))
    total = total + (first_bn_multiplier if l == 0 else 1.0) * r
  return total


def recovery_losses(teacher, images: jax.Array, labels: jax.Array, *, r_bn: float,
                    first_bn_multiplier: float):
  """Per-batch SRe2L objective of `images` `[G, B, H, W, C]` with class ids `labels` `[G, B]`:
  L_g = mean_b CE(teacher(x_gb), y_gb) + r_bn · R_BN(x_g). One teacher call for all G batches
  (eval mode: each image's output does not depend on the others).

  Returns:
    (`[G]` losses, `[G]` cross-entropies, `[G]` R_BN).
  """
  g, b = images.shape[:2]
  out, captured = bn_inputs(teacher.apply_fn, teacher.variables,
                            images.reshape(g * b, *images.shape[2:]))
  ce = cross_entropy(out.logits, labels.reshape(-1)).reshape(g, b).mean(1)
  bn = bn_statistics_loss(captured, teacher.variables["batch_stats"],
                          first_bn_multiplier=first_bn_multiplier, groups=g)
  return ce + r_bn * bn, ce, bn


# --- Augmentation ---------------------------------------------------------------------------

def draw_jitter(rng: np.random.Generator, groups: int, jitter: int) -> np.ndarray:
  """`[G, 2]` int32 roll offsets in [0, jitter] (`random.randint(0, jitter)`, both ends)."""
  return rng.integers(0, jitter + 1, size=(groups, 2)).astype(np.int32)


def jitter_roll(images: jax.Array, offsets: jax.Array) -> jax.Array:
  """`torch.roll(x, (o_h, o_w), dims=(H, W))` of each group: images `[G, B, H, W, C]`,
  offsets `[G, 2]` (traced)."""
  return jax.vmap(lambda x, o: jnp.roll(x, (o[0], o[1]), axis=(1, 2)))(images, offsets)


def draw_resized_crop(rng: np.random.Generator, height: int, width: int,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of a crop covering a
  `scale` fraction of the area with aspect ratio w/h in `ratio` (log-uniform); 10 tries, then
  the centre crop of the nearest allowed ratio."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """`[out_size, in_size]` weights of `jax.image.resize(..., "linear", antialias=True)` from the
  pixels [start, start + length) of an axis to `out_size` pixels, zero outside that range:
  the triangle kernel, widened by length / out_size when shrinking, normalised per output."""
  start, length = jnp.asarray(start, jnp.float32), jnp.asarray(length, jnp.float32)
  scale = out_size / length
  x = (jnp.arange(out_size) + 0.5) / scale - 0.5                     # sample points, crop coords
  i = jnp.arange(in_size) - start                                      # input pixels, crop coords
  w = jnp.maximum(0.0, 1.0 - jnp.abs(i[None] - x[:, None]) * jnp.minimum(scale, 1.0))
  w = jnp.where((i >= 0) & (i < length), w, 0.0)
  return w / w.sum(1, keepdims=True)


def crop_resize(images: jax.Array, box, size: tuple[int, int]) -> jax.Array:
  """The crop `box` (top, left, h, w; may be traced) of `images` `[..., H, W, C]` resized to
  `size`: exactly `jax.image.resize(crop, size, "linear", antialias=True)` (bilinear with
  antialiasing, as torchvision's resized crop), written as two weight matrices so that one
  compiled function serves every box."""
  box = jnp.asarray(box, jnp.float32)
  rows = _resize_weights(box[0], box[2], images.shape[-3], size[0])
  cols = _resize_weights(box[1], box[3], images.shape[-2], size[1])
  return jnp.einsum("oh,...hwc,pw->...opc", rows, images, cols,
                    precision=jax.lax.Precision.HIGHEST)


def crop_flip(images: jax.Array, boxes: jax.Array, flips: jax.Array) -> jax.Array:
  """SRe2L's ImageNet augmentation before the jitter: per group one `RandomResizedCrop` to the
  input size and one horizontal flip (torchvision draws one of each for a batched tensor).
  images `[G, B, H, W, C]`, boxes `[G, 4]`, flips `[G]` bool."""
  size = images.shape[2:4]

  def one(x, box, flip):
    x = crop_resize(x, box, size)
    return jnp.where(flip, x[:, :, ::-1], x)

  return jax.vmap(one)(images, boxes, flips)


def draw_augment(rng: np.random.Generator, groups: int, image_hw: tuple[int, int], *,
                 augment: str, jitter: int, crop_scale=(0.08, 1.0)) -> dict:
  """One iteration's host draws for `augment_groups`: offsets `[G, 2]`, and for "crop" boxes
  `[G, 4]` and flips `[G]`."""
  if augment not in AUGMENTS:
    raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
  draws = {}
  if augment == "crop":
    draws["boxes"] = np.array([draw_resized_crop(rng, *image_hw, scale=crop_scale)
                               for _ in range(groups)], np.float32)
    draws["flips"] = rng.random(groups) < 0.5
  draws["offsets"] = draw_jitter(rng, groups, jitter)
  return draws


def augment_groups(images: jax.Array, draws: dict) -> jax.Array:
  """Applies `draw_augment`'s draws to `images` `[G, B, H, W, C]`: crop + flip (if drawn),
  then the jitter roll."""
  if "boxes" in draws:
    images = crop_flip(images, draws["boxes"], draws["flips"])
  return jitter_roll(images, draws["offsets"])


# --- Optimizer ------------------------------------------------------------------------------

def clip_to_range(low, high) -> optax.GradientTransformation:
  """Makes the update land in [low, high] (broadcast over the last axis): the reference's
  `clip` after every `optimizer.step()`. Needs the params in `update`."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("clip_to_range needs params")
    new = jax.tree.map(lambda p, u: jnp.clip(p + u, low, high) - p, params, updates)
    return new, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def recovery_optimizer(lr: float, iterations: int, betas=(0.5, 0.9), eps: float = 1e-8,
                       clip: tuple | None = None) -> optax.GradientTransformation:
  """Adam(betas, eps) with the reference's `lr_cosine_policy(lr, 0, iterations)`:
  lr_i = lr · ½(1 + cos(π i / iterations)) at step i; then `clip_to_range(*clip)` if given."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, max(iterations, 1)), b1=betas[0], b2=betas[1],
                  eps=eps)
  return tx if clip is None else optax.chain(tx, clip_to_range(*clip))


# --- The method -----------------------------------------------------------------------------

@dataclasses.dataclass
class SRe2LRecovery:
  """SRe2L's recover stage (module docstring). Defaults: `recover_cifar.sh` (CIFAR-100).

  Attributes:
    iterations: optimisation steps (1000; ImageNet's `recover.sh` uses 4000).
    lr: Adam's peak lr, cosine-decayed to 0 (0.25).
    betas, eps: Adam's (0.5, 0.9), 1e-8.
    r_bn: weight of R_BN (0.01).
    first_bn_multiplier: extra weight of the first BatchNorm (10).
    jitter: roll offsets drawn in [0, jitter] pixels (4 for CIFAR; 32 for ImageNet at 224).
    augment: "jitter" (the CIFAR script: roll only) or "crop" (the ImageNet script:
      RandomResizedCrop(scale `crop_scale`, ratio (3/4, 4/3)) and a horizontal flip, then roll).
    crop_scale: RandomResizedCrop's area range (torchvision's default (0.08, 1)).
    clip: clip pixels to the real images' per-channel range after every step (True).
  The set is `ipc` images per class in class order, hard labels; batch j holds images
  c·ipc + j of every class c.
  """
  uses_teacher = True  # the job trains the teacher (a class attribute, not a field)
  name: str = "sre2l"
  iterations: int = 1000
  lr: float = 0.25
  betas: tuple[float, float] = (0.5, 0.9)
  eps: float = 1e-8
  r_bn: float = 0.01
  first_bn_multiplier: float = 10.0
  jitter: int = 4
  augment: str = "jitter"
  crop_scale: tuple[float, float] = (0.08, 1.0)
  clip: bool = True

  def prepare(self, context: Context) -> None:
    teacher = require_bn_teacher(context)
    if self.augment not in AUGMENTS:
      raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
    self._context = context
    num_classes, ipc = context.num_classes, context.ipc
    labels = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), (ipc, 1))    # [ipc, C]

    def objective(images, draws):
      shape = images.shape[1:]
      batches = images.reshape(num_classes, ipc, *shape).swapaxes(0, 1)     # [ipc, C, H, W, ch]
      losses, ce, bn = recovery_losses(teacher, augment_groups(batches, draws), labels,
                                       r_bn=self.r_bn, first_bn_multiplier=self.first_bn_multiplier)
      return losses.sum(), (ce.mean(), bn.mean())

    self._value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))

  def start(self, context: Context) -> Start:
    shape = (context.num_classes * context.ipc, *context.train_images.shape[1:])
    images = np.random.default_rng(context.seed).standard_normal(shape).astype(np.float32)
    clip = pixel_range(context.train_images) if self.clip else None
    tx = recovery_optimizer(self.lr, self.iterations, self.betas, self.eps, clip)
    return Start(values={"images": jnp.asarray(images)}, optimizers={"images": tx})

  def draws(self, iteration: int) -> dict:
    """Iteration `iteration`'s augmentation draws (a function of (seed, iteration) only)."""
    c = self._context
    return draw_augment(iteration_rng(c.seed, iteration), c.ipc, c.train_images.shape[1:3],
                        augment=self.augment, jitter=self.jitter, crop_scale=self.crop_scale)

  def value_and_grad(self, values: dict, state: Any, iteration: int) -> Step:
    (loss, (ce, bn)), grad = self._value_and_grad(values["images"], self.draws(iteration))
    return Step(loss=loss, grads={"images": grad}, state=state,
                metrics={"ce": float(ce), "bn": float(bn)})

  def distilled(self, values: dict) -> DistilledSet:
    return hard_label_set(values, self._context)
