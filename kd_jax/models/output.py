"""The output every kd_jax model returns."""
from typing import Any

import flax
import jax


@flax.struct.dataclass
class ModelOutput:
  """Logits plus named intermediate features.

  Attributes:
    logits: `[batch, num_classes]` (or `[batch, tokens, vocab]`).
    features: named taps, e.g. `"stage1"` `[B, H, W, C]`, `"pre_logits"` `[B, D]`,
      `"attn/3"` `[B, heads, T, T]`. Keys are stable per architecture.
  """
  logits: jax.Array
  features: dict[str, Any] = flax.struct.field(default_factory=dict)
