"""Standard numpy augmentations for the input pipeline: random crop with zero padding, horizontal flip, normalisation.

Random draws and their application are separate so that the pipeline can draw for the whole global batch from
(seed, step) and apply only a host's slice: every host, and a run resumed at any step, sees the same augmentations.
The crop follows torchvision's `RandomCrop(size, padding=p)`: pad `p` zero pixels on each side, then crop a random
window of the original size, i.e. shift the image by up to `p` pixels in each direction (He et al., 2016).
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation.

  Attributes:
    crop_padding: pad each side with this many zero pixels and crop back to the original size (a random shift of
      up to this many pixels); 0 disables it. Usual: 4 for 32x32 CIFAR, 1 for 8x8 digits.
    flip: mirror left-right with probability 1/2 (on for CIFAR, off for digits).
  """
  crop_padding: int = 0
  flip: bool = False

  def __post_init__(self):
    if not isinstance(self.crop_padding, (int, np.integer)) or self.crop_padding < 0:
      raise ValueError(f"AugmentConfig.crop_padding must be an integer >= 0, got {self.crop_padding!r}.")


# Usual training augmentation of each dataset (±1-pixel shifts on digits).
AUGMENT_PRESETS = {
    "digits": AugmentConfig(crop_padding=1, flip=False),
    "cifar10": AugmentConfig(crop_padding=4, flip=True),
    "cifar100": AugmentConfig(crop_padding=4, flip=True),
}


def sample_augment(config: AugmentConfig, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random draws for `num` images: `shifts` int [num, 2] in [-p, p] (rows, cols) and `flips` bool [num]."""
  p = config.crop_padding
  shifts = rng.integers(-p, p + 1, size=(num, 2)) if p else np.zeros((num, 2), np.int64)
  flips = rng.random(num) < 0.5 if config.flip else np.zeros(num, bool)
  return {"shifts": shifts, "flips": flips}


def shift_with_zeros(images: np.ndarray, shifts: np.ndarray, padding: int) -> np.ndarray:
  """Crop-with-padding: `out[n, i, j] = images[n, i + dy, j + dx]` (zero outside), `(dy, dx) = shifts[n]`.

  Args:
    images: `[n, H, W, C]`.
    shifts: int `[n, 2]`, each in `[-padding, padding]`.
    padding: the zero padding added on each side.
  """
  n, h, w = images.shape[:3]
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = shifts[:, 0, None] + padding + np.arange(h)  # [n, H]
  cols = shifts[:, 1, None] + padding + np.arange(w)  # [n, W]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def apply_augment(images: np.ndarray, draws: dict[str, np.ndarray], config: AugmentConfig) -> np.ndarray:
  """Applies `sample_augment`'s draws to `images [n, H, W, C]`; same dtype and shape out."""
  if config.crop_padding:
    images = shift_with_zeros(images, draws["shifts"], config.crop_padding)
  if config.flip:
    images = np.where(draws["flips"][:, None, None, None], images[:, :, ::-1], images)
  return images


def normalize(images: np.ndarray, mean=None, std=None) -> np.ndarray:
  """float32 `(x - mean) / std` per channel, where uint8 pixels are first scaled to [0, 1] (x / 255).

  Float images are taken as they are (e.g. a distilled set stored already normalised: pass `mean=None`).
  """
  x = images.astype(np.float32)
  if images.dtype == np.uint8:
    x /= np.float32(255)
  if mean is None and std is None:
    return x
  if mean is None or std is None:
    raise ValueError(f"Give both mean and std or neither; got mean={mean!r}, std={std!r}.")
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if mean.shape not in ((), (x.shape[-1],)) or std.shape not in ((), (x.shape[-1],)):
    raise ValueError(f"mean and std must be scalars or have one value per channel ({x.shape[-1]}); got shapes "
                     f"{mean.shape} and {std.shape}.")
  return (x - mean) / std
