"""MobileNetV2 for CIFAR as used in KD (RepDistiller's `mobile_half`: expansion 6, width 0.5).

conv3×3 stride 2, seven stages of inverted residual blocks (1×1 expand-BN-ReLU,
depthwise 3×3-BN-ReLU, 1×1 project-BN; identity shortcut when the shape is kept),
conv1×1 to 1280-BN-ReLU, global average pool, linear head. Reference: RepDistiller
`models/mobilenetv2.py` (Sandler et al., CVPR 2018; CIFAR variant from RCO, Jin et al. 2019).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput

# (channels, blocks, first stride) of the seven stages; expansion is 1 in the first.
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
# Which stage outputs are the KD taps stage1..stage4 (the reference's f1..f4).
_TAPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}


class InvertedResidual(nn.Module):
  """Expand 1×1, depthwise 3×3, linear projection 1×1; residual when stride 1 and shape kept."""
  out_channels: int
  stride: int
  expansion: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, 1, dtype=self.dtype, name="expand")(x)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="expand_bn")(y))
    y = conv(hidden, 3, self.stride, groups=hidden, dtype=self.dtype, name="depthwise")(y)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="depthwise_bn")(y))
    y = conv(self.out_channels, 1, dtype=self.dtype, name="project")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="project_bn")(y)
    if self.stride == 1 and x.shape[-1] == self.out_channels:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 with expansion `expansion` and width multiplier `width_mult`.

  Attributes:
    num_classes: logits size.
    expansion: expansion ratio T of stages 2–7 (6).
    width_mult: channel multiplier W (0.5 for `mobile_half`); the last conv keeps 1280 unless W > 1.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"` (after the stride-2 conv), `"stage1"`..`"stage4"` = outputs of the 2nd,
  3rd, 5th and 7th block groups (the reference's f1..f4; at 32×32: 16×16, 8×8, 4×4, 2×2; they
  end in BN without ReLU, so they are already pre-activation), `"pre_logits"` `[B, 1280]`.
  """
  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    x = conv(int(32 * self.width_mult), 3, 2, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    features = {"stem": x}
    for s, (channels, num_blocks, stride) in enumerate(_STAGES):
      for i in range(num_blocks):
        x = InvertedResidual(int(channels * self.width_mult), stride if i == 0 else 1,
                             1 if s == 0 else self.expansion, self.dtype,
                             name=f"stage{s}_block{i}")(x, train)
      if s in _TAPS:
        features[_TAPS[s]] = x
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = conv(last, 1, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(x))
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
