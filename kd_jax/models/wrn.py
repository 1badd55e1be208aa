"""Wide ResNets WRN-d-k for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Pre-activation blocks (BN-ReLU-conv3×3, BN-ReLU-conv3×3) with widths 16k, 32k, 64k and
strides 1, 2, 2, n = (d − 4) / 6 blocks per stage, then BN-ReLU, global average pool and a
linear head. Reference: RepDistiller `models/wrn.py` (Zagoruyko & Komodakis, BMVC 2016).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput


class WideBlock(nn.Module):
  """Pre-activation basic block. When the width changes, the shortcut is a conv1×1 of the
  activated input (as in the reference); otherwise it is the raw input."""
  width: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    activated = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    y = conv(self.width, 3, self.stride, dtype=self.dtype, name="conv1")(activated)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
    y = conv(self.width, 3, 1, dtype=self.dtype, name="conv2")(y)
    if x.shape[-1] == self.width:
      return x + y
    return conv(self.width, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(activated) + y


class WideResNet(nn.Module):
  """WRN-`depth`-`widen_factor`.

  Attributes:
    num_classes: logits size.
    depth: 6n + 4 (16, 40, ...).
    widen_factor: k, the width multiplier of the three stages.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"` (the first conv), `"stage{k}"` for k = 1..3, the stage outputs
  `[B, H/2^(k-1), W/2^(k-1), 16·2^(k-1)·widen_factor]` (residual sums, before any BN-ReLU),
  and `"pre_logits"` `[B, 64·widen_factor]`.
  """
  num_classes: int
  depth: int = 16
  widen_factor: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError("WideResNet depth must be 6n+4 with n >= 1 (10, 16, 40, ...), "
                       f"got {self.depth}.")
    n = (self.depth - 4) // 6
    x = conv(16, 3, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    features = {"stem": x}
    for stage, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
      for i in range(n):
        x = WideBlock(width * self.widen_factor, stride if i == 0 else 1, self.dtype,
                      name=f"stage{stage}_block{i}")(x, train)
      features[f"stage{stage}"] = x
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_final")(x))
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
