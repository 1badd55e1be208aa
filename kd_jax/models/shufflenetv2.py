"""ShuffleNetV2 for CIFAR as used in KD (RepDistiller's `ShuffleV2`: widths 116/232/464).

conv1×1(24)-BN-ReLU, three stages each of one stride-2 down block and 3/7/3 basic blocks
(split channels in half, run 1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU on the second half,
concatenate, shuffle with 2 groups), conv1×1(1024)-BN-ReLU, global average pool, linear
head. Reference: RepDistiller `models/ShuffleNetv2.py` (Ma et al., ECCV 2018).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, channel_shuffle, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput


class ShuffleV2Block(nn.Module):
  """Basic block. Returns `(out, preact)`: the shuffled output and, as in the reference, the
  unshuffled concatenation of the untouched half with the branch before its last ReLU."""
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    c = x.shape[-1] // 2
    kept, y = x[..., :c], x[..., c:]
    y = conv(c, 1, dtype=self.dtype, name="conv1")(y)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
    y = conv(c, 3, groups=c, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="bn2")(y)
    y = conv(c, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="bn3")(y)
    out = channel_shuffle(jnp.concatenate([kept, nn.relu(y)], axis=-1), 2)
    return out, jnp.concatenate([kept, y], axis=-1)


class ShuffleV2Down(nn.Module):
  """Stride-2 block: two branches of out_channels / 2 each, concatenated and shuffled."""
  out_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    mid, c = self.out_channels // 2, x.shape[-1]
    left = conv(c, 3, 2, groups=c, dtype=self.dtype, name="left_dw")(x)
    left = batch_norm(train=train, dtype=self.dtype, name="left_dw_bn")(left)
    left = conv(mid, 1, dtype=self.dtype, name="left_pw")(left)
    left = nn.relu(batch_norm(train=train, dtype=self.dtype, name="left_pw_bn")(left))
    right = conv(mid, 1, dtype=self.dtype, name="right_pw1")(x)
    right = nn.relu(batch_norm(train=train, dtype=self.dtype, name="right_pw1_bn")(right))
    right = conv(mid, 3, 2, groups=mid, dtype=self.dtype, name="right_dw")(right)
    right = batch_norm(train=train, dtype=self.dtype, name="right_dw_bn")(right)
    right = conv(mid, 1, dtype=self.dtype, name="right_pw2")(right)
    right = nn.relu(batch_norm(train=train, dtype=self.dtype, name="right_pw2_bn")(right))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 with stage widths `widths` and a final 1×1 conv of `last_channels`.

  Attributes:
    num_classes: logits size.
    widths: output channels of the three stages.
    num_blocks: basic blocks per stage (after its down block).
    last_channels: channels of the final 1×1 conv.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"`, `"stage{k}"` `[B, H/2^k, W/2^k, widths[k-1]]` and `"stage{k}_preact"`
  (the reference's unshuffled pre-ReLU concatenation) for k = 1..3, `"pre_logits"`
  `[B, last_channels]`.
  """
  num_classes: int
  widths: Sequence[int] = (116, 232, 464)
  num_blocks: Sequence[int] = (3, 7, 3)
  last_channels: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    x = conv(24, 1, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    features = {"stem": x}
    for stage, (width, num_blocks) in enumerate(zip(self.widths, self.num_blocks), start=1):
      x = ShuffleV2Down(width, self.dtype, name=f"stage{stage}_down")(x, train)
      for i in range(num_blocks):
        x, preact = ShuffleV2Block(self.dtype, name=f"stage{stage}_block{i}")(x, train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact
    x = conv(self.last_channels, 1, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(x))
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
