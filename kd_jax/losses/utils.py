"""Reductions, schedules and hyperparameter checks shared by the losses and the train step."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def check_hparam(loss: str, name: str, value: Any, ok: Callable[[Any], Any],
                 requirement: str) -> None:
  """Raises `ValueError("<loss>: <name> must be <requirement>, got <value>")` unless `ok(value)`.

  Only a concrete value is checked: a traced one (the hyperparameter is an argument of a
  `jax.jit`-ed function, e.g. a temperature schedule) cannot be read in Python, so it is
  passed through unchecked; validate such values before tracing.

  >>> check_hparam("kd", "temperature", 4.0, lambda t: t > 0, "> 0")
  >>> check_hparam("kd", "temperature", 0.0, lambda t: t > 0, "> 0")
  Traceback (most recent call last):
  ...
  ValueError: kd: temperature must be > 0, got 0.0
  >>> jax.jit(lambda t: check_hparam("kd", "temperature", t, lambda t: t > 0, "> 0"))(0.0)
  """
  if isinstance(value, jax.core.Tracer):
    return
  if not bool(np.all(ok(value))):
    raise ValueError(f"{loss}: {name} must be {requirement}, got {value!r}")


def check_choice(loss: str, name: str, value: Any, choices: tuple) -> None:
  """Raises `ValueError` unless `value` is one of `choices` (a static, structural hyperparameter
  such as a mode string).

  >>> check_choice("at", "mode", "math", ("code", "paper"))
  Traceback (most recent call last):
  ...
  ValueError: at: mode must be 'code' or 'paper', got 'math'
  """
  if value not in choices:
    raise ValueError(f"{loss}: {name} must be {' or '.join(map(repr, choices))}, got {value!r}")


def check_positive(loss: str, **hparams: Any) -> None:
  """`check_hparam(loss, name, value, > 0)` for each keyword."""
  for name, value in hparams.items():
    check_hparam(loss, name, value, lambda v: v > 0, "> 0")


def check_non_negative(loss: str, **hparams: Any) -> None:
  """`check_hparam(loss, name, value, >= 0)` for each keyword."""
  for name, value in hparams.items():
    check_hparam(loss, name, value, lambda v: v >= 0, ">= 0")


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of `values` over entries where `mask` is true (> 0).

  Masked entries are selected out, not multiplied by 0, so a non-finite value there (a padded
  token's overflowing loss) changes neither the mean nor the gradient, which is exactly 0 there.

  Args:
    values: `[B, ...]` per-example (or per-token) loss values.
    mask: `[B]` (`[B, T]`...) or broadcastable to `values`; `None` means all entries count.
  Returns:
    Scalar in at least float32 (float64 stays float64); 0 when the mask is empty.

  >>> float(masked_mean(jnp.array([1., 2., 9.]), jnp.array([1, 1, 0])))
  1.5
  >>> float(masked_mean(jnp.array([1., 2., jnp.nan]), jnp.array([1, 1, 0])))
  1.5
  """
  values = jnp.asarray(values)
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask)
  mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
  keep = jnp.broadcast_to(mask > 0, values.shape)
  return jnp.sum(jnp.where(keep, values, 0.0)) / jnp.maximum(jnp.sum(keep, dtype=values.dtype), 1.0)


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
