"""A small Vision Transformer that exposes per-layer attention maps and values.

Patchify with a `patch_size`×`patch_size` stride-`patch_size` conv, add learned position
embeddings, `depth` pre-LayerNorm encoder blocks (multi-head self-attention, GELU MLP),
a final LayerNorm and global average pooling over tokens (no class token, as big_vision's
`pool_type="gap"`), then a linear head. Because every token is a patch, block outputs are
also returned as spatial maps, so CNN feature losses apply unchanged. Attention
probabilities and values feed MiniLM-style losses (Wang et al., NeurIPS 2020). The blocks, made
causal and given a key/value cache, are also `TransformerLM`'s.
Reference: Dosovitskiy et al., ICLR 2021; big_vision `models/vit.py`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kd_jax.models.layers import classifier
from kd_jax.models.output import ModelOutput


class SelfAttention(nn.Module):
  """Multi-head self-attention, optionally causal and with a key/value cache.

  With `cache = {"key", "value"}` `[B, L, h, d]`, the T tokens of `x` sit at positions
  `position, ..., position + T - 1`: their keys and values are written into the cache there
  and they attend causally over it (incremental decoding).

  Returns `(out [B, T, D], taps, cache)`: taps `"attn"` `[B, h, T, S]` probabilities over the
  S = T (or L) keys and the per-head `"queries"`, `"keys"`, `"values"` `[B, h, T, D/h]` of
  `x`; the updated cache, or None without one.
  """
  num_heads: int
  dtype: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None = None,
               position: jax.Array | int = 0) -> tuple[jax.Array, dict, dict | None]:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"The token width {dim} must be a multiple of num_heads={self.num_heads}.")
    head_dim = dim // self.num_heads
    project = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    q, k, v = project("query")(x), project("key")(x), project("value")(x)  # [B, T, h, d]
    keys, values = k, v
    if cache is not None:
      update = lambda buf, new: lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               position, axis=1)
      cache = {"key": update(cache["key"], k), "value": update(cache["value"], v)}
      keys, values = cache["key"].astype(self.dtype), cache["value"].astype(self.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys).astype(jnp.float32) / jnp.sqrt(head_dim)
    if self.causal or cache is not None:
      query_pos = position + jnp.arange(x.shape[1])
      visible = jnp.arange(keys.shape[1])[None, :] <= query_pos[:, None]
      scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values)
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    heads = lambda t: t.transpose(0, 2, 1, 3)
    return out, {"attn": probs, "queries": heads(q), "keys": heads(k), "values": heads(v)}, cache


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Returns `(x, taps, cache)` as `SelfAttention` (a causal block is a GPT decoder block).
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, cache: dict | None = None,
               position: jax.Array | int = 0) -> tuple[jax.Array, dict, dict | None]:
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    y, taps, cache = SelfAttention(self.num_heads, self.dtype, self.causal, name="attention")(
        nn.LayerNorm(dtype=self.dtype, name="ln1")(x), cache, position)
    x = x + dropout(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y))
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp2")(dropout(y))
    return x + dropout(y), taps, cache


class ViT(nn.Module):
  """ViT on `patch_size` patches (inputs' H and W must be multiples of it). The position
  embeddings are sized at init, so apply it to inputs of the size it was initialised on.

  Attributes:
    num_classes: logits size.
    patch_size: side of the square patches (4 on 32×32 gives 64 tokens; 2 on 8×8 gives 16).
    hidden_dim: token width D (a multiple of num_heads).
    depth: number of encoder blocks.
    num_heads: attention heads h.
    mlp_dim: hidden width of the block MLPs.
    dropout_rate: dropout on embeddings and residual branches; needs the `dropout` rng when
      training with a rate > 0.
    dtype: compute dtype; params stay float32, softmax runs in float32, logits are float32.

  Features, with T = (H/p)·(W/p) tokens: `"stage{i+1}"` `[B, H/p, W/p, D]`, the output of block
  i as a map; `"attn/{i}"` `[B, h, T, T]` attention probabilities; `"values/{i}"`
  `[B, h, T, D/h]`; `"pre_logits"` `[B, D]`, the mean token after the final LayerNorm.
  """
  num_classes: int
  patch_size: int = 4
  hidden_dim: int = 192
  depth: int = 4
  num_heads: int = 3
  mlp_dim: int = 768
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    _, height, width, _ = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"ViT patch_size={p} must divide the input size {height}×{width}; "
                       "pick a patch size that divides both.")
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(x.astype(self.dtype))
    grid = x.shape[1:3]
    x = x.reshape(x.shape[0], -1, self.hidden_dim)
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos_embed.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    features = {}
    for i in range(self.depth):
      x, taps, _ = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype,
                                name=f"block{i}")(x, train)
      features[f"stage{i + 1}"] = x.reshape(x.shape[0], *grid, self.hidden_dim)
      features[f"attn/{i}"] = taps["attn"]
      features[f"values/{i}"] = taps["values"]
    x = jnp.mean(nn.LayerNorm(dtype=self.dtype, name="ln_final")(x), axis=1)
    features["pre_logits"] = x
    logits = classifier(self.num_classes, self.dtype)(x)
    return ModelOutput(logits=logits.astype(jnp.float32), features=features)
