"""Mixed precision: the config's `precision` name → the models' compute dtype.

`"bfloat16"` runs convolutions and matmuls in bf16 while params (the optimizer's master
copy), gradients, BatchNorm statistics, logits and losses stay float32:

  * models take `dtype=compute_dtype(config.precision)`, cast their input to it and keep
    `param_dtype=float32` (`kd_jax.models.create_model`);
  * losses cast their inputs to float32 (docs/design.md, "Losses"), so the objective is float32.

bf16 has float32's exponent range, so no loss scaling is needed; float16 is not offered
for that reason.
"""
import jax.numpy as jnp

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(precision: str):
  """`"float32"` → `jnp.float32`, `"bfloat16"` → `jnp.bfloat16`; anything else raises."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r} is unknown; valid: {', '.join(PRECISIONS)} "
                     "(float16 needs loss scaling and is not supported)")
  return PRECISIONS[precision]
