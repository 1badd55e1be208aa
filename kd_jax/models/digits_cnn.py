"""The two small CNNs of the default 8×8 digits job.

conv3×3-ReLU layers, each optionally followed by a 2×2 max pool, then a linear head on
the flattened last map; no normalisation, so no model state.

`digits_cnn_teacher`: 32 channels at 8×8, 64 channels, pool; 4×4×64 → head.
`digits_cnn_student`: 16 channels, pool, 32 channels, pool; 2×2×32 → head.
Measured here on sklearn's digits (a random 1,300 train / 497 test split, pixels / 16,
SGD 0.05 momentum 0.9, weight decay 5e-4, cosine decay, ±1-pixel shifts, batch 64,
30 epochs, 8 seeds): teacher 98.6% (98.0–99.2), student 97.5% (96.6–98.0).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import classifier, conv
from kd_jax.models.output import ModelOutput


class DigitsCNN(nn.Module):
  """Small conv net for 8×8×1 digits (any H, W divisible by 2^(number of pools)).

  Attributes:
    num_classes: logits size.
    widths: channels of the conv layers.
    pools: for each conv, whether a 2×2 max pool follows it.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stage{k}"` after conv k (and its pool), one per conv — two for the registered
  models (teacher on 8×8: `[B, 8, 8, 32]`, `[B, 4, 4, 64]`; student: `[B, 4, 4, 16]`,
  `[B, 2, 2, 32]`) — and `"pre_logits"`, the flattened last map.
  """
  num_classes: int
  widths: Sequence[int] = (32, 64)
  pools: Sequence[bool] = (False, True)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if len(self.widths) != len(self.pools):
      raise ValueError(f"DigitsCNN needs one pools entry per conv: widths={self.widths}, "
                       f"pools={self.pools}.")
    x = x.astype(self.dtype)
    features = {}
    for k, (width, pool) in enumerate(zip(self.widths, self.pools), start=1):
      x = nn.relu(conv(width, 3, dtype=self.dtype, use_bias=True, name=f"conv{k}")(x))
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      features[f"stage{k}"] = x
    x = x.reshape(x.shape[0], -1)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
