"""RDED: realistic, diverse patches of real images, scored by the teacher and stitched.

Sun et al., "On the Diversity and Realism of Distilled Dataset: An Efficient Dataset
Distillation Paradigm" (CVPR 2024); reference `RDED/synthesize/main.py` (`init_images`) and
`RDED/synthesize/utils.py` (`MultiRandomCrop`, `selector`, `mix_images`).

For every class c:
  1. draw `mipc` of its real images;
  2. take `num_crop` RandomResizedCrop patches of each (area scale `crop_scale`, aspect ratio 1,
     resized bilinearly with antialiasing to (H/factor, W/factor));
  3. score each patch by the teacher's cross-entropy on c (−realism), the patch zero-padded to
     H×W around the centre; keep each image's best patch, then the n = ipc·factor² best images'
     patches in ascending cross-entropy;
  4. stitch: image t (of ipc) gets in its grid cell k (row-major of factor×factor) the patch of
     rank k·ipc + t (`mix_images`; nearest resize to the cell when H is not divisible).

Selection only: `iterations = 0`; `start` holds the set; hard labels (the reference relabels
with the teacher when it trains on the set: that is the evaluation's business).

Departures: candidates and crops are drawn with `SeedSequence(seed)`; the crop resize is
`jax.image.resize`'s bilinear antialiased kernel (`recovery.crop_resize`; torchvision's
antialiased bilinear resize is the same triangle filter), the stitching resize
`jax.image.resize` "nearest" (F.interpolate's default); images stay float32.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data.pipeline import pad_rows
from kd_jax.dataset_distill.method import Context, DistilledSet, Start, Step, hard_label_set
from kd_jax.dataset_distill.recovery import crop_resize, draw_resized_crop
from kd_jax.dataset_distill.synthetic import class_indices
from kd_jax.step import cross_entropy

_BATCH = 256  # crops per compiled call (padded to it: one compile)


@functools.partial(jax.jit, static_argnames=("size",))
def _crop_batch(images, boxes, size):
  return jax.vmap(lambda x, b: crop_resize(x, b, size))(images, boxes)


def crop_patches(images: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Crops `boxes` `[M, K, 4]` (top, left, h, w) of `images` `[M, H, W, C]`, each resized to
  `size` as `jax.image.resize(crop, size, "linear", antialias=True)` (torchvision's
  RandomResizedCrop, bilinear with antialiasing; `recovery.crop_resize`). Returns
  `[M, K, *size, C]`."""
  images = np.asarray(images, np.float32)
  m, k = boxes.shape[:2]
  flat = boxes.reshape(m * k, 4).astype(np.float32)
  source = np.repeat(np.arange(m), k)
  whole = np.array([0, 0, *images.shape[1:3]], np.float32)        # padding rows: valid boxes
  flat = np.concatenate([flat, np.tile(whole, (-len(flat) % _BATCH, 1))])
  out = [np.asarray(_crop_batch(pad_rows(images[source[s:s + _BATCH]], _BATCH), flat[s:s + _BATCH],
                                tuple(size)))
         for s in range(0, m * k, _BATCH)]
  return np.concatenate(out)[:m * k].reshape(m, k, *size, images.shape[-1])


def pad_center(patches: np.ndarray, height: int, width: int) -> np.ndarray:
  """Zero-pads `[N, h, w, C]` to `[N, height, width, C]` around the centre (the reference's
  `pad`: top/left get the smaller half)."""
  h, w = patches.shape[1:3]
  top, left = (height - h) // 2, (width - w) // 2
  return np.pad(patches, ((0, 0), (top, height - h - top), (left, width - w - left), (0, 0)))


def stitch(patches: np.ndarray, factor: int, ipc: int, height: int, width: int) -> np.ndarray:
  """`mix_images`: `patches` `[factor²·ipc, h, w, C]` (rank order) → `[ipc, height, width, C]`;
  cell (i, j) of image t holds patch (i·factor + j)·ipc + t, resized (nearest) to the cell,
  cells in the first `height % factor` rows (`width % factor` columns) one pixel larger."""
  s_h, s_w = height // factor, width // factor
  out = np.zeros((ipc, height, width, patches.shape[-1]), np.float32)
  k, top = 0, 0
  for i in range(factor):
    h_r = s_h + 1 if i < height % factor else s_h
    left = 0
    for j in range(factor):
      w_r = s_w + 1 if j < width % factor else s_w
      part = patches[k * ipc:(k + 1) * ipc]
      if part.shape[1:3] != (h_r, w_r):
        part = np.asarray(jax.image.resize(part, (ipc, h_r, w_r, part.shape[-1]), "nearest"))
      out[:, top:top + h_r, left:left + w_r] = part
      left += w_r
      k += 1
    top += h_r
  return out


@dataclasses.dataclass
class RDED:
  """RDED selection (module docstring). Defaults: the reference's ImageNet scripts (factor 2,
  `num_crop` 5, `mipc` 300; its CIFAR/Tiny-ImageNet scripts use factor 1).

  Attributes:
    factor: patches per side of a stitched image (1: each image is one whole selected crop).
    num_crop: patches drawn per candidate image.
    mipc: candidate real images per class (all of a class's images when it has fewer; it needs
      at least ipc·factor²).
    crop_scale: RandomResizedCrop's area range (torchvision's default (0.08, 1); the reference
      leaves it at the default).
  After `prepare`, `selection` holds per class `source` `[ipc·factor²]` (train indices of the
  kept patches, rank order), `boxes` `[ipc·factor², 4]` (top, left, h, w) and `scores` (their
  cross-entropies).
  """
  uses_teacher = True  # the job trains the teacher (a class attribute, not a field)
  name: str = "rded"
  iterations: int = 0
  factor: int = 2
  num_crop: int = 5
  mipc: int = 300
  crop_scale: tuple[float, float] = (0.08, 1.0)

  def prepare(self, context: Context) -> None:
    if context.teacher is None:
      raise ValueError("RDED needs context.teacher to score patches")
    if self.iterations != 0:
      raise ValueError(f"RDED is selection only: iterations must be 0, got {self.iterations}")
    teacher = context.teacher
    images, labels = np.asarray(context.train_images, np.float32), np.asarray(context.train_labels)
    height, width = images.shape[1:3]
    if self.factor < 1 or min(height, width) < self.factor:
      raise ValueError(f"factor={self.factor} does not fit {height}×{width} images")
    size = (height // self.factor, width // self.factor)
    n_keep = context.ipc * self.factor ** 2

    @jax.jit
    def score(x, y):
      out, _ = teacher.apply_fn(teacher.variables, x, train=False)
      return cross_entropy(out.logits, y)

    rng = np.random.default_rng(context.seed)  # SeedSequence(seed), not an iteration's child
    stitched, self.selection = [], {"source": [], "boxes": [], "scores": []}
    for c, idx in enumerate(class_indices(labels, context.num_classes)):
      cand = rng.permutation(idx)[:self.mipc]
      if len(cand) < n_keep:
        raise ValueError(f"RDED keeps ipc·factor² = {n_keep} patches per class but class {c} "
                         f"has {len(cand)} candidate images (mipc={self.mipc})")
      boxes = np.array([[draw_resized_crop(rng, height, width, self.crop_scale, (1.0, 1.0))
                         for _ in range(self.num_crop)] for _ in cand], np.int64)   # [M, K, 4]
      patches = crop_patches(images[cand], boxes, size)                          # [M, K, h, w, C]
      flat = pad_center(patches.reshape(-1, *patches.shape[2:]), height, width)
      target = jnp.full((_BATCH,), c, jnp.int32)
      ce = np.concatenate([np.asarray(score(pad_rows(flat[s:s + _BATCH], _BATCH), target))
                           for s in range(0, len(flat), _BATCH)])[:len(flat)]
      ce = ce.reshape(len(cand), self.num_crop)
      best = np.argmin(ce, 1)                                  # each image's best crop
      best_ce = ce[np.arange(len(cand)), best]
      keep = np.argsort(best_ce, kind="stable")[:n_keep]       # the most realistic images
      self.selection["source"].append(cand[keep])
      self.selection["boxes"].append(boxes[keep, best[keep]])
      self.selection["scores"].append(best_ce[keep])
      stitched.append(stitch(patches[keep, best[keep]], self.factor, context.ipc, height, width))
    self.selection = {k: np.stack(v) for k, v in self.selection.items()}
    self._images = np.concatenate(stitched).astype(np.float32)
    self._context = context

  def start(self, context: Context) -> Start:
    return Start(values={"images": jnp.asarray(self._images)}, optimizers={})

  def value_and_grad(self, values: dict, state: Any, iteration: int) -> Step:
    raise NotImplementedError("RDED is selection only (iterations = 0): nothing to optimise")

  def distilled(self, values: dict) -> DistilledSet:
    return hard_label_set(values, self._context)

