"""A plain multilayer perceptron on the flattened input."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import classifier, torch_default_init
from kd_jax.models.output import ModelOutput


class MLP(nn.Module):
  """Flatten → (Dense → ReLU) per hidden size → linear head.

  Attributes:
    num_classes: logits size.
    hidden_sizes: widths of the hidden layers (at least one).
    dtype: compute dtype; params stay float32 and logits are returned in float32.

  Features: `"stage{k}"` `[B, hidden_sizes[k-1]]` after the k-th hidden layer (1-based) and
  `"pre_logits"`, the last of them.
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    if not self.hidden_sizes:
      raise ValueError("MLP hidden_sizes must list at least one hidden width, got ().")
    x = x.astype(self.dtype).reshape(x.shape[0], -1)
    features = {}
    for k, width in enumerate(self.hidden_sizes, start=1):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=torch_default_init,
                           name=f"dense{k}")(x))
      features[f"stage{k}"] = x
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
