"""ConvNet-D/W, the network of dataset distillation (DC, DSA, MTT, TESLA, DATM).

Each of `depth` blocks is conv3×3(width, bias) → norm → ReLU → pool 2×2; a linear
head reads the flattened last map. At 32×32 the default ConvNet-3 (width 128, instance
norm, average pooling) ends on a 4×4×128 map and has 320,010 params for 10 classes.
Reference: MTT `utils/networks.py` (Cazenavette et al., CVPR 2022). Difference: the first
conv always uses 'SAME' padding (MTT pads 1-channel 28×28 inputs by 3 to reach 32×32).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, torch_default_init
from kd_jax.models.output import ModelOutput

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")


class ConvNet(nn.Module):
  """ConvNet-`depth` with `width` channels.

  Attributes:
    num_classes: logits size.
    depth: number of conv blocks.
    width: channels of every conv.
    norm: one of `NORMS`. "instancenorm" is GroupNorm with one group per channel
      (affine); "layernorm" normalises each example over (H, W, C); "groupnorm" uses 4
      groups; "batchnorm" keeps running statistics in `batch_stats`.
    pooling: one of `POOLINGS` (2×2, stride 2).
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stage{d}"` `[B, H/2^d, W/2^d, width]` after block d (1-based), and
  `"pre_logits"` `[B, H·W·width / 4^depth]`, the last map flattened in (H, W, C) order
  (PyTorch flattens (C, H, W); mind this when porting MTT head weights).
  """
  num_classes: int
  depth: int = 3
  width: int = 128
  norm: str = "instancenorm"
  pooling: str = "avgpooling"
  dtype: Any = jnp.float32

  def _norm(self, x: jax.Array, train: bool) -> jax.Array:
    if self.norm == "instancenorm":
      return nn.GroupNorm(num_groups=self.width, epsilon=1e-5, dtype=self.dtype)(x)
    if self.norm == "groupnorm":
      return nn.GroupNorm(num_groups=4, epsilon=1e-5, dtype=self.dtype)(x)
    if self.norm == "layernorm":
      axes = (-3, -2, -1)
      return nn.LayerNorm(epsilon=1e-5, reduction_axes=axes, feature_axes=axes, dtype=self.dtype)(x)
    if self.norm == "batchnorm":
      return batch_norm(train=train, dtype=self.dtype)(x)
    return x

  def _pool(self, x: jax.Array) -> jax.Array:
    if self.pooling == "avgpooling":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.pooling == "maxpooling":
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    return x

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if self.norm not in NORMS:
      raise ValueError(f"ConvNet norm={self.norm!r} is not supported; use one of {NORMS}.")
    if self.pooling not in POOLINGS:
      raise ValueError(f"ConvNet pooling={self.pooling!r} is not supported; use one of {POOLINGS}.")
    if self.depth < 1 or self.width < 1:
      raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={self.depth}, "
                       f"width={self.width}.")
    features = {}
    x = x.astype(self.dtype)
    for d in range(self.depth):
      x = nn.Conv(self.width, (3, 3), padding="SAME", kernel_init=torch_default_init,
                  dtype=self.dtype)(x)
      x = nn.relu(self._norm(x, train))
      x = self._pool(x)
      features[f"stage{d + 1}"] = x
    x = x.reshape(x.shape[0], -1)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
