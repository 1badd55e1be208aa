"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19) as in RepDistiller/mdistiller.

Five blocks of conv3×3(bias)-BN-ReLU layers (the last ReLU of each block is applied
outside it, so its pre-activation can be tapped), 2×2 max pools after blocks 0–2 (and
after block 3 for inputs of 64 px or more, as the reference does for 64×64), a global
average pool and one linear layer on 512 features. Reference: RepDistiller `models/vgg.py`
(Simonyan & Zisserman, 2015).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, classifier, conv, global_avg_pool
from kd_jax.models.output import ModelOutput

# Channels of the convs in each of the 5 blocks (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
VGG_BLOCKS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
  """VGG-BN with `blocks` conv widths (default: vgg13).

  Attributes:
    num_classes: logits size.
    blocks: five tuples of conv widths, e.g. `VGG_BLOCKS[13]`.
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stem"` (block 0, after ReLU), `"stage{k}"` (block k after ReLU) and
  `"stage{k}_preact"` (before it) for k = 1..4 — at 32×32 these are 16×16, 8×8, 4×4, 4×4 —
  and `"pre_logits"` `[B, blocks[4][-1]]`.
  """
  num_classes: int
  blocks: Sequence[Sequence[int]] = VGG_BLOCKS[13]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if len(self.blocks) != 5:
      raise ValueError(f"VGG blocks must list 5 blocks of conv widths, got {len(self.blocks)}.")
    pool_after = (0, 1, 2, 3) if x.shape[1] >= 64 else (0, 1, 2)
    x = x.astype(self.dtype)
    features = {}
    for b, widths in enumerate(self.blocks):
      for i, width in enumerate(widths):
        if i:
          x = nn.relu(x)
        x = conv(width, 3, dtype=self.dtype, use_bias=True, name=f"block{b}_conv{i}")(x)
        x = batch_norm(train=train, dtype=self.dtype, name=f"block{b}_bn{i}")(x)
      if b:
        features[f"stage{b}_preact"] = x
      x = nn.relu(x)
      features["stem" if b == 0 else f"stage{b}"] = x
      if b in pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
