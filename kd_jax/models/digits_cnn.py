"""The two small CNNs of the default 8×8 digits job (DESIGN.md §9).

Two blocks of conv3×3-BN-ReLU-maxpool 2×2, then a linear head on the flattened 2×2 map:
`digits_cnn_teacher` has 32/64 channels, `digits_cnn_student` 16/32.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, conv
from kd_jax.models.output import ModelOutput


class DigitsCNN(nn.Module):
  """Small conv net for 8×8×1 digits (any H, W divisible by 4 works).

  Attributes:
    num_classes: logits size.
    widths: channels of the conv blocks, e.g. `(32, 64)` (teacher) or `(16, 32)` (student).
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stage{k}"` `[B, H/2^k, W/2^k, widths[k-1]]` after block k (only as many stages
  as blocks: two for the registered models) and `"pre_logits"`, the flattened last map
  (`[B, 4·widths[-1]]` on 8×8 inputs).
  """
  num_classes: int
  widths: Sequence[int] = (32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    x = x.astype(self.dtype)
    features = {}
    for k, width in enumerate(self.widths, start=1):
      x = conv(width, 3, dtype=self.dtype, name=f"conv{k}")(x)
      x = nn.relu(batch_norm(train=train, dtype=self.dtype, name=f"bn{k}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      features[f"stage{k}"] = x
    x = x.reshape(x.shape[0], -1)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
