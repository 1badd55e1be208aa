"""Reductions and schedules shared by the losses and the train step."""
import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of `values` over entries where `mask` is true.

  Args:
    values: `[B, ...]` per-example (or per-token) loss values.
    mask: `[B]` or broadcastable to `values`; `None` means all entries count.
  Returns:
    Scalar in at least float32 (float64 stays float64); 0 when the mask is empty.

  >>> float(masked_mean(jnp.array([1., 2., 9.]), jnp.array([1, 1, 0])))
  1.5
  """
  values = jnp.asarray(values)
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, values.dtype)
  mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
  mask = jnp.broadcast_to(mask, values.shape)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def warmup_factor(step, warmup_steps: int | float) -> jax.Array:
  """Linear warm-up `min(step / warmup_steps, 1)` (DKD multiplies its loss by this).

  >>> float(warmup_factor(5, 20))
  0.25
  """
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if warmup_steps == 0:
    return jnp.float32(1.0)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
