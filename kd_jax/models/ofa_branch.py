"""OFA-KD's branch projectors: an intermediate student feature → class logits.

One-for-All KD compares heterogeneous networks in logit space: each chosen student stage gets
a small branch that ends in a classifier, and the branch's logits are trained toward the
teacher's logits with OFA's adaptive-target loss (`kd_jax.losses.ofa`). The branch's shape
follows the student's feature kind:

- `"conv"` (CNN maps `[B, H, W, C]`): `downsample` depthwise-separable stride-2 blocks
  (channels doubling, the last to `width`), or a 1×1 conv to `width` when there are none;
  global average pooling; a linear classifier.
- `"tokens"` (ViT tokens `[B, T, D]`, or their `[B, H, W, D]` grid): `downsample` 2×2 patch
  mergings to `width` (LayerNorm → linear, GELU between them), `blocks` transformer blocks,
  mean over tokens, a linear classifier.
- `"linear"` (MLP vectors `[B, D]`): a linear classifier.

Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS 2023. Reference: Hao840/OFAKD `distillers/ofa.py` and
`distillers/utils.py` (`SepConv`, `PatchMerging`); the branches are initialised as there
(Kaiming-normal fan-out convs, truncated-normal 0.02 linears, zero biases). Departures: the
transformer block is kd_jax's ViT block (`kd_jax.models.vit.EncoderBlock`, its own
initialisation and LayerNorm ε 1e-6, biased Q/K/V) where OFA uses timm's `Block`; the number of
stride-2 blocks or merges is set per tap from its grid (OFA: 4 − stage for CNNs, log2(grid/7)
merges for ViTs), so `width` reaches a token branch only through its merges.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import layers
from kd_jax.models.vit import EncoderBlock

BRANCH_KINDS = ("conv", "tokens", "linear")

_linear_init = nn.initializers.truncated_normal(0.02)


class SeparableConv(nn.Module):
  """Two depthwise-separable 3×3 convs, the first with stride 2 (DARTS' `SepConv`):
  depthwise → pointwise → BN → ReLU → depthwise → pointwise to `features` → BN → ReLU."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    channels = x.shape[-1]
    for stride, out in ((2, channels), (1, self.features)):
      x = layers.conv(channels, 3, stride, groups=channels, dtype=jnp.float32)(x)
      x = layers.conv(out, 1, dtype=jnp.float32)(x)
      x = nn.relu(layers.batch_norm(train=train, dtype=jnp.float32)(x))
    return x


class PatchMerging(nn.Module):
  """Swin's 2×2 patch merging on a token grid `[B, H, W, D]` → `[B, H/2, W/2, features]`:
  concatenate each 2×2 neighbourhood, LayerNorm, bias-free linear."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, d = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch merging needs an even token grid, got {h}×{w}; lower "
                       "options.final_grid's merges")
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = nn.LayerNorm(epsilon=1e-5)(x)
    return nn.Dense(self.features, use_bias=False, kernel_init=_linear_init)(x)


class OFABranch(nn.Module):
  """One student feature → `[B, num_classes]` logits (see the module docstring).

  Attributes:
    kind: `"conv"`, `"tokens"` or `"linear"`.
    num_classes: the logits' size.
    width: the branch's feature width (OFA: the larger of the student's and the teacher's
      final widths for CNN students, the student's for ViT students).
    downsample: stride-2 blocks (conv) or patch mergings (tokens).
    blocks: transformer blocks (tokens only).
    num_heads: their attention heads.
  """
  kind: str
  num_classes: int
  width: int
  downsample: int = 0
  blocks: int = 1
  num_heads: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kind == "conv":
      if x.ndim != 4:
        raise ValueError(f"a conv branch needs maps [B, H, W, C], got shape {x.shape}")
      if self.downsample == 0:
        x = layers.conv(self.width, 1, use_bias=True, dtype=jnp.float32)(x)
      for i in range(self.downsample):
        last = i == self.downsample - 1
        x = SeparableConv(self.width if last else 2 * x.shape[-1])(x, train=train)
      x = layers.global_avg_pool(x)
    elif self.kind == "tokens":
      x = _token_grid(x)
      for i in range(self.downsample):
        x = PatchMerging(self.width)(x)
        if i == 0 or i < self.downsample - 1:  # OFA: GELU after all but a later last merge
          x = nn.gelu(x, approximate=False)
      x = x.reshape(x.shape[0], -1, x.shape[-1])
      if x.shape[-1] % self.num_heads:
        raise ValueError(f"the branch's token width {x.shape[-1]} is not a multiple of "
                         f"num_heads={self.num_heads}")
      for _ in range(self.blocks):
        x, _, _ = EncoderBlock(self.num_heads, 4 * x.shape[-1], 0.0, jnp.float32)(x, train)
      x = jnp.mean(x, axis=1)
    elif self.kind == "linear":
      x = x.reshape(x.shape[0], -1)
    else:
      raise ValueError(f"branch kind {self.kind!r} is unknown; valid: {', '.join(BRANCH_KINDS)}")
    return nn.Dense(self.num_classes, kernel_init=_linear_init)(x)


def _token_grid(x: jax.Array) -> jax.Array:
  """`[B, T, D]` with T a square → `[B, √T, √T, D]`; a grid passes through."""
  if x.ndim == 4:
    return x
  if x.ndim != 3 or math.isqrt(x.shape[1])**2 != x.shape[1]:
    raise ValueError(f"a token branch needs [B, T, D] with T a square, or a token grid "
                     f"[B, H, W, D]; got shape {x.shape}")
  side = math.isqrt(x.shape[1])
  return x.reshape(x.shape[0], side, side, x.shape[2])


def default_kind(x: jax.ShapeDtypeStruct) -> str:
  """The branch for a tap's rank: maps → conv, tokens → tokens, vectors → linear."""
  return {4: "conv", 3: "tokens", 2: "linear"}.get(len(x.shape), "linear")


def halvings(size: int, final: int) -> int:
  """The stride-2 steps from `size` down to `final` (0 when already there): ⌊log2(size/final)⌋."""
  return max(int(math.floor(math.log2(size / final))), 0) if final > 0 else 0
