"""CIFAR ResNets (resnet8 … resnet110, resnet8x4, resnet32x4) as in RepDistiller/mdistiller.

conv3×3(w0)-BN-ReLU, three stages of n = (depth − 2) / 6 basic blocks with widths
w1, w2, w3 and strides 1, 2, 2, global average pool, linear head. Shortcuts are
conv1×1-BN projections wherever the shape changes. Reference: RepDistiller
`models/resnet.py` (He et al., 2016; the ×4 variants from Tian et al., CRD, ICLR 2020).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput


class BasicBlock(nn.Module):
  """Two conv3×3-BN layers plus the shortcut. Returns `(relu(out), out)` (post, pre-activation)."""
  width: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    y = conv(self.width, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
    y = conv(self.width, 3, 1, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = conv(self.width, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(x)
      x = batch_norm(train=train, dtype=self.dtype, name="shortcut_bn")(x)
    preact = y + x
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """ResNet-`depth` for 32×32 inputs (any size works: the pool is global).

  Attributes:
    num_classes: logits size.
    depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
    widths: `(stem, stage1, stage2, stage3)` channels: `(16, 16, 32, 64)`, or
      `(32, 64, 128, 256)` for the ×4 models.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"` (after conv-BN-ReLU), `"stage{k}"` `[B, H/2^(k-1), W/2^(k-1), widths[k]]` for
  k = 1..3 and their pre-ReLU sums `"stage{k}_preact"` (RepDistiller's `preact=True`),
  `"pre_logits"` `[B, widths[3]]`.
  """
  num_classes: int
  depth: int = 20
  widths: Sequence[int] = (16, 16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError("CifarResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), "
                       f"got {self.depth}.")
    if len(self.widths) != 4:
      raise ValueError("CifarResNet widths must have 4 entries (stem, stage1..3), "
                       f"got {self.widths}.")
    n = (self.depth - 2) // 6
    x = conv(self.widths[0], 3, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    features = {"stem": x}
    for stage, (width, stride) in enumerate(zip(self.widths[1:], (1, 2, 2)), start=1):
      for i in range(n):
        x, preact = BasicBlock(width, stride if i == 0 else 1, self.dtype,
                               name=f"stage{stage}_block{i}")(x, train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
