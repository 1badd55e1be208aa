"""Model registry: `create_model("resnet8x4", num_classes=100)`.

Names follow RepDistiller/mdistiller (`resnet32x4`, `wrn_40_2`, `vgg13`, ...) plus
`convnet` (MTT), `mlp`, `vit_tiny` and the two digits CNNs of the default job.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.convnet import ConvNet

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
}


def list_models() -> list[str]:
  """Sorted names accepted by `create_model`."""
  return sorted(_MODELS)


def create_model(name: str, *, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
  """Builds the registered model `name`.

  Args:
    name: one of `list_models()`.
    num_classes: logits size.
    dtype: compute dtype (e.g. `jnp.bfloat16`); params stay float32, logits are float32.
    **kwargs: overrides of the architecture's fields (e.g. `width=64` for `convnet`).

  Raises:
    ValueError: unknown name, or a keyword the architecture does not have.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
  factory = _MODELS[name]
  cls = factory.func if isinstance(factory, functools.partial) else factory
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"model {name!r} has no field(s) {unknown}; its fields are {sorted(fields)}")
  return factory(num_classes=num_classes, dtype=dtype, **kwargs)
