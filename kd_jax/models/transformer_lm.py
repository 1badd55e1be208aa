"""A small decoder-only (GPT-style) transformer language model with a key/value cache.

Token plus learned position embeddings, `depth` pre-LayerNorm causal blocks (the ViT's
`EncoderBlock` with `causal=True`), a final LayerNorm and a linear LM head. The full forward
exposes per-layer block outputs, causal attention maps and per-head queries, keys and values
for MiniLM / MiniLMv2 losses (Wang et al., NeurIPS 2020; ACL Findings 2021). `extend` and
`decode_step` run the same parameters incrementally against a cache from `init_cache`.
Reference: Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kd_jax.models.output import ModelOutput
from kd_jax.models.vit import EncoderBlock


class TransformerLM(nn.Module):
  """Causal LM over `tokens [B, T]` int32, T ≤ max_len.

  Attributes:
    vocab_size: V, the logits size.
    width: token width D (a multiple of num_heads).
    depth: number of causal blocks.
    num_heads: attention heads h.
    mlp_dim: hidden width of the block MLPs.
    max_len: longest sequence (the position-embedding table and cache length).
    dropout_rate: dropout on embeddings and residual branches; needs the `dropout` rng when
      training with a rate > 0.
    dtype: compute dtype; params stay float32, softmax runs in float32, logits are float32.

  Features of `__call__`, with d = D/h: `"block{i}"` `[B, T, D]` the output of block i;
  `"attn/{i}"` `[B, h, T, T]` causal attention probabilities; `"queries/{i}"`, `"keys/{i}"`,
  `"values/{i}"` `[B, h, T, d]`; `"hidden"` `[B, T, D]`, the final LayerNorm's output that the
  LM head (params `"lm_head"`, kernel `[D, V]`, bias `[V]`) reads.
  """
  vocab_size: int
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 256
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                          dtype=self.dtype)
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (self.max_len, self.width))
    self.dropout = nn.Dropout(self.dropout_rate)
    self.blocks = [EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype,
                                causal=True, name=f"block{i}") for i in range(self.depth)]
    self.ln_final = nn.LayerNorm(dtype=self.dtype)
    self.lm_head = nn.Dense(self.vocab_size, dtype=self.dtype)

  def __call__(self, tokens: jax.Array, *, train: bool) -> ModelOutput:
    logits, features, _ = self._run(tokens, train=train, cache=None, position=0)
    return ModelOutput(logits=logits, features=features)

  def init_cache(self, batch_size: int, dtype: Any = jnp.float32) -> tuple[dict, ...]:
    """Empty per-layer `{"key", "value"}` buffers `[B, max_len, h, d]` (no params needed)."""
    shape = (batch_size, self.max_len, self.num_heads, self.width // self.num_heads)
    return tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                 for _ in range(self.depth))

  def extend(self, tokens: jax.Array, cache: tuple[dict, ...],
             position: jax.Array | int) -> tuple[jax.Array, tuple[dict, ...]]:
    """Eval-mode forward of `tokens [B, T]` at positions `position ... position + T - 1`
    (int32 scalar, may be traced; position + T ≤ max_len is the caller's to keep), attending to
    the cached earlier positions.

    Returns `(logits [B, T, V] float32, cache)` with the tokens' keys and values written in.
    """
    logits, _, cache = self._run(tokens, train=False, cache=cache, position=position)
    return logits, cache

  def decode_step(self, token: jax.Array, cache: tuple[dict, ...],
                  position: jax.Array | int) -> tuple[jax.Array, tuple[dict, ...]]:
    """`extend` on one token `[B]`: returns `(logits [B, V], cache)`."""
    logits, cache = self.extend(token[:, None], cache, position)
    return logits[:, 0], cache

  def _run(self, tokens, *, train, cache, position):
    num_tokens = tokens.shape[1]
    if num_tokens > self.max_len:
      raise ValueError(f"TransformerLM got {num_tokens} tokens but max_len={self.max_len}; "
                       "shorten the sequence or build the model with a larger max_len.")
    pos_embed = lax.dynamic_slice_in_dim(self.pos_embed, position, num_tokens)
    x = self.embed(tokens) + pos_embed.astype(self.dtype)
    x = self.dropout(x, deterministic=not train)
    features, new_cache = {}, []
    for i, block in enumerate(self.blocks):
      x, taps, layer_cache = block(x, train, None if cache is None else cache[i], position)
      new_cache.append(layer_cache)
      features[f"block{i}"] = x
      features.update({f"{name}/{i}": taps[name] for name in ("attn", "queries", "keys", "values")})
    x = self.ln_final(x)
    features["hidden"] = x
    logits = self.lm_head(x).astype(jnp.float32)
    return logits, features, None if cache is None else tuple(new_cache)
