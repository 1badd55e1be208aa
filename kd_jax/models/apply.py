"""Adapts a Flax linen module to kd_jax's apply-function contract (docs/design.md, "Models")."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.output import ModelOutput

# Collections that are model state rather than params (updated in train mode).
MUTABLE_COLLECTIONS = ("batch_stats",)


def make_apply_fn(module: nn.Module):
  """Returns `apply_fn(variables, x, *, train, rngs=None) -> (ModelOutput, new_model_state)`.

  `variables = {"params": ..., **model_state}`. In train mode the mutable collections
  (BatchNorm statistics) are updated and returned; in eval mode the input state is
  returned unchanged.
  """

  def apply_fn(variables, x, *, train: bool, rngs=None):
    model_state = {k: v for k, v in variables.items() if k != "params"}
    mutable = [k for k in MUTABLE_COLLECTIONS if k in model_state] if train else False
    if mutable:
      out, new_state = module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
      return out, {**model_state, **new_state}
    out = module.apply(variables, x, train=train, rngs=rngs)
    return out, model_state

  return apply_fn


def init_model(module: nn.Module, rng: jax.Array, input_shape) -> tuple[Any, dict]:
  """Initialises `module` on a zero batch of `input_shape` `[B, H, W, C]`.

  Returns:
    `(params, model_state)`, with model_state e.g. `{"batch_stats": ...}` or `{}`.
  """
  params_rng, dropout_rng = jax.random.split(rng)
  variables = jax.jit(lambda r, d: module.init({"params": r, "dropout": d},
                                               jnp.zeros(input_shape, jnp.float32), train=False)
                      )(params_rng, dropout_rng)
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def count_params(params) -> int:
  """Number of scalars in a params tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
