"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), as MTT's `DiffAugment`.

Every transform is differentiable in the images, so gradients flow back to synthetic pixels.
One key drives a whole call: the family choice and the per-image parameters are all drawn from
it, so calling again with the same key and the same batch shape gives the same augmentation
("siamese"). Trajectory matching relies on this to recompute a step exactly in its backward
pass.

Defaults follow MTT's `ParamDiffAug`: flip 0.5, scale 1.2, rotate ±15°, crop-pad 0.125,
cutout 0.5, brightness 1.0, saturation 2.0, contrast 0.5. Mode "single" (MTT's 'S') applies
one family per call, chosen uniformly from the strategy; "all" (MTT's 'M') applies them all in
the strategy's order. Images are NHWC (MTT is NCHW: its flip of dim 3 is our width flip).
"""
import dataclasses

import jax
import jax.numpy as jnp

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("single", "all")


@dataclasses.dataclass(frozen=True)
class DSAParams:
  """Ranges of the random transforms (MTT's `ParamDiffAug`)."""
  prob_flip: float = 0.5
  ratio_scale: float = 1.2
  ratio_rotate: float = 15.0
  ratio_crop_pad: float = 0.125
  ratio_cutout: float = 0.5
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5


def _uniform(key, n, shape=()):
  return jax.random.uniform(key, (n, *shape))


def _color(x, key, p):
  kb, ks, kc = jax.random.split(key, 3)
  n = x.shape[0]
  x = x + (_uniform(kb, n, (1, 1, 1)) - 0.5) * p.brightness
  mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - mean) * (_uniform(ks, n, (1, 1, 1)) * p.saturation) + mean
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_uniform(kc, n, (1, 1, 1)) + p.contrast) + mean


def _shift_matrix(shift, size):
  """`[B, size, size]` one-hot rows: output row i reads input row i + shift (zero outside)."""
  rows = jnp.arange(size)
  return (rows[None, None, :] == rows[None, :, None] + shift[:, None, None]).astype(jnp.float32)


def _crop(x, key, p):
  """Integer translation by up to ratio_crop_pad·size pixels, zero fill (MTT `rand_crop`)."""
  n, h, w, _ = x.shape
  kx, ky = jax.random.split(key)
  sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
  ty = jax.random.randint(kx, (n,), -sh, sh + 1)
  tx = jax.random.randint(ky, (n,), -sw, sw + 1)
  rows, cols = _shift_matrix(ty, h).astype(x.dtype), _shift_matrix(tx, w).astype(x.dtype)
  return jnp.einsum("bih,bhwc,bjw->bijc", rows, x, cols)


def _cutout(x, key, p):
  """Zeroes a square of side ratio_cutout·size at a random centre (MTT `rand_cutout`)."""
  n, h, w, _ = x.shape
  kx, ky = jax.random.split(key)
  ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
  oy = jax.random.randint(kx, (n,), 0, h + (1 - ch % 2)) - ch // 2
  ox = jax.random.randint(ky, (n,), 0, w + (1 - cw % 2)) - cw // 2
  in_rows = (jnp.arange(h)[None] >= oy[:, None]) & (jnp.arange(h)[None] < oy[:, None] + ch)
  in_cols = (jnp.arange(w)[None] >= ox[:, None]) & (jnp.arange(w)[None] < ox[:, None] + cw)
  keep = 1.0 - (in_rows[:, :, None] & in_cols[:, None, :]).astype(x.dtype)
  return x * keep[..., None]


def _flip(x, key, p):
  flip = _uniform(key, x.shape[0], (1, 1, 1)) < p.prob_flip
  return jnp.where(flip, x[:, :, ::-1], x)


def _affine(x, theta):
  """`F.grid_sample(x, F.affine_grid(theta), align_corners=True)`: bilinear, zero padding.

  theta: `[B, 2, 3]` mapping output (u, v) in [-1, 1] (width, height) to input coordinates.
  """
  n, h, w, _ = x.shape
  v, u = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
  base = jnp.stack([u, v, jnp.ones_like(u)], -1)                        # [H, W, 3]
  grid = jnp.einsum("hwk,bjk->bhwj", base, theta.astype(base.dtype))     # [B, H, W, 2]
  px = (grid[..., 0] + 1.0) / 2.0 * (w - 1)
  py = (grid[..., 1] + 1.0) / 2.0 * (h - 1)
  x0, y0 = jnp.floor(px), jnp.floor(py)

  def corner(img, cy, cx, weight):
    valid = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
    yi = jnp.clip(cy, 0, h - 1).astype(jnp.int32)
    xi = jnp.clip(cx, 0, w - 1).astype(jnp.int32)
    return img[yi, xi] * (weight * valid)[..., None].astype(img.dtype)

  def sample(img, x0, y0, px, py):
    wx1, wy1 = px - x0, py - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    return (corner(img, y0, x0, wy0 * wx0) + corner(img, y0, x0 + 1, wy0 * wx1) +
            corner(img, y0 + 1, x0, wy1 * wx0) + corner(img, y0 + 1, x0 + 1, wy1 * wx1))

  return jax.vmap(sample)(x, x0, y0, px, py)


def _scale(x, key, p):
  kx, ky = jax.random.split(key)
  lo, span = 1.0 / p.ratio_scale, p.ratio_scale - 1.0 / p.ratio_scale
  sx = _uniform(kx, x.shape[0]) * span + lo
  sy = _uniform(ky, x.shape[0]) * span + lo
  zeros = jnp.zeros_like(sx)
  theta = jnp.stack([jnp.stack([sx, zeros, zeros], -1), jnp.stack([zeros, sy, zeros], -1)], 1)
  return _affine(x, theta)


def _rotate(x, key, p):
  angle = (_uniform(key, x.shape[0]) - 0.5) * 2.0 * p.ratio_rotate / 180.0 * jnp.pi
  cos, sin, zeros = jnp.cos(angle), jnp.sin(angle), jnp.zeros_like(angle)
  theta = jnp.stack([jnp.stack([cos, -sin, zeros], -1), jnp.stack([sin, cos, zeros], -1)], 1)
  return _affine(x, theta)


FAMILIES = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
            "rotate": _rotate}


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """'color_crop_flip' → ('color', 'crop', 'flip'); raises on unknown families."""
  families = tuple(f for f in strategy.split("_") if f)
  unknown = [f for f in families if f not in FAMILIES]
  if not families or unknown:
    raise ValueError(f"DSA strategy {strategy!r} has unknown families {unknown}; use '_'-joined "
                     f"names from {sorted(FAMILIES)}, e.g. {DEFAULT_STRATEGY!r}")
  return families


def diff_augment(images: jax.Array, key: jax.Array, *, strategy: str = DEFAULT_STRATEGY,
                 mode: str = "single", params: DSAParams = DSAParams()) -> jax.Array:
  """Augments a batch differentiably; deterministic given `key`.

  Args:
    images: `[B, H, W, C]` float.
    key: one PRNG key for the whole batch; per-image parameters are drawn from it.
    strategy: '_'-joined family names (see `FAMILIES`).
    mode: "single" (one family per call, MTT's default 'S') or "all".
    params: transform ranges.
  Returns:
    `[B, H, W, C]`, same dtype.
  """
  families = parse_strategy(strategy)
  if mode not in MODES:
    raise ValueError(f"DSA mode must be one of {MODES}, got {mode!r}")
  choice_key, key = jax.random.split(key)
  fns = [lambda x, k, f=FAMILIES[name]: f(x, k, params).astype(images.dtype) for name in families]
  if mode == "all":
    for fn, k in zip(fns, jax.random.split(key, len(fns))):
      images = fn(images, k)
    return images
  index = jax.random.randint(choice_key, (), 0, len(fns))
  return jax.lax.switch(index, fns, images, key)


def same_transform(augment, images: jax.Array, key: jax.Array) -> jax.Array:
  """Applies to every image the transform `augment` gives a batch of one with `key`.

  DSA's Siamese augmentation as DC, DSA and DM use it (VICO-UoE/DatasetCondensation
  `DiffAugment(x, strategy, seed=s)`, `param.Siamese`): all images share one parameter set, so
  two batches of any sizes augmented with the same key (a class's real and synthetic images)
  get the same transform. `diff_augment` alone draws per-image parameters whose values depend
  on the batch size.

  Args:
    augment: `augment(images [B, H, W, C], key) -> images`, e.g. `diff_augment`.
    images: `[B, H, W, C]`.
    key: the PRNG key of the transform.
  Returns:
    `[B, H, W, C]`.
  """
  return jax.vmap(lambda x: augment(x[None], key)[0])(images)
