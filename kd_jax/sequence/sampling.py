"""Autoregressive sampling from a `TransformerLM` with its key/value cache.

On-policy distillation trains the student on its own continuations: the student samples, the
teacher scores the sampled tokens (GKD, Agarwal et al., ICLR 2024; MiniLLM, Gu et al., ICLR 2024).
"""
import functools

import jax
import jax.numpy as jnp

from kd_jax.models.transformer_lm import TransformerLM


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames="temperature")
def sample(module: TransformerLM, params, prompt: jax.Array, num_tokens: int, rng: jax.Array, *,
           temperature: float = 1.0) -> jax.Array:
  """Continues `prompt [B, P]` int32 by `num_tokens` tokens drawn from softmax(logits / T).

  The prompt is prefilled into the cache in one pass, then a `lax.scan` runs `num_tokens`
  single-token decode steps. Jitted, with `module`, `num_tokens` and `temperature` static;
  deterministic for a fixed `rng`.

  Args:
    module: the language model; `params` are its `"params"` collection.
    params: the model's params.
    prompt: `[B, P]` int32 tokens, P ≥ 1 and P + num_tokens ≤ module.max_len.
    num_tokens: how many tokens to generate.
    rng: PRNG key.
    temperature: softmax temperature T; 0 takes the argmax (greedy decoding).
  Returns:
    `[B, P + num_tokens]` int32: the prompt unchanged, then the sampled tokens.
  """
  batch_size, prompt_len = prompt.shape
  if prompt_len < 1 or prompt_len + num_tokens > module.max_len:
    raise ValueError(f"sample: needs 1 ≤ prompt length ({prompt_len}) and prompt length + "
                     f"num_tokens ({prompt_len} + {num_tokens}) ≤ max_len={module.max_len}.")
  if temperature < 0:
    raise ValueError(f"sample: temperature must be ≥ 0, got {temperature}.")
  variables = {"params": params}
  logits, cache = module.apply(variables, prompt, module.init_cache(batch_size, module.dtype), 0,
                               method=TransformerLM.extend)

  def step(carry, key):
    logits, cache, position = carry
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
    logits, cache = module.apply(variables, token, cache, position,
                                 method=TransformerLM.decode_step)
    return (logits, cache, position + 1), token

  _, tokens = jax.lax.scan(step, (logits[:, -1], cache, jnp.int32(prompt_len)),
                           jax.random.split(rng, num_tokens))
  return jnp.concatenate([prompt.astype(jnp.int32), tokens.T], axis=1)
