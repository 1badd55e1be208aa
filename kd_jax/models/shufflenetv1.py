"""ShuffleNetV1 for CIFAR as used in KD (RepDistiller's `ShuffleV1`: groups 3, widths 240/480/960).

conv1×1(24)-BN-ReLU, three stages of 4/8/4 bottlenecks (grouped 1×1-BN-ReLU, channel
shuffle, depthwise 3×3-BN-ReLU, grouped 1×1-BN, then ReLU of the sum with the input, or of
the concatenation with a 3×3/2 average pool of it in a stage's first, stride-2 block),
global average pool, linear head. Reference: RepDistiller `models/ShuffleNetv1.py`
(Zhang et al., CVPR 2018).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, channel_shuffle, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput


class ShuffleV1Block(nn.Module):
  """ShuffleNetV1 bottleneck. Returns `(relu(out), out)` (post, pre-activation)."""
  out_channels: int
  stride: int
  groups: int
  first_groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    branch_channels = self.out_channels - (x.shape[-1] if self.stride == 2 else 0)
    mid = branch_channels // 4
    y = conv(mid, 1, groups=self.first_groups, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
    y = channel_shuffle(y, self.first_groups)
    y = conv(mid, 3, self.stride, groups=mid, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
    y = conv(branch_channels, 1, groups=self.groups, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="bn3")(y)
    if self.stride == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             count_include_pad=True)
      preact = jnp.concatenate([y, shortcut], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """ShuffleNetV1 with `groups` groups and stage widths `widths`.

  Attributes:
    num_classes: logits size.
    widths: output channels of the three stages.
    num_blocks: bottlenecks per stage.
    groups: groups of the 1×1 convs (the first conv of the first block is ungrouped).
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"`, `"stage{k}"` `[B, H/2^k, W/2^k, widths[k-1]]` and their pre-ReLU
  `"stage{k}_preact"` for k = 1..3, `"pre_logits"` `[B, widths[-1]]`.
  """
  num_classes: int
  widths: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    x = conv(24, 1, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    features = {"stem": x}
    for stage, (width, num_blocks) in enumerate(zip(self.widths, self.num_blocks), start=1):
      for i in range(num_blocks):
        first_groups = 1 if stage == 1 and i == 0 else self.groups
        x, preact = ShuffleV1Block(width, 2 if i == 0 else 1, self.groups, first_groups, self.dtype,
                                   name=f"stage{stage}_block{i}")(x, train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
