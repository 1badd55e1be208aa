"""Model registry: `create_model("resnet8x4", num_classes=100)`.

Names follow RepDistiller/mdistiller (`resnet32x4`, `wrn_40_2`, `vgg13`, ...;
`mobilenetv2` is its `mobile_half`, `shufflenetv1`/`shufflenetv2` its `ShuffleV1`/`ShuffleV2`)
plus `convnet` (MTT), `mlp`, `vit_tiny` and the two digits CNNs of the default job.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.convnet import ConvNet
from kd_jax.models.digits_cnn import DigitsCNN
from kd_jax.models.mlp import MLP
from kd_jax.models.mobilenetv2 import MobileNetV2
from kd_jax.models.resnet import CifarResNet
from kd_jax.models.shufflenetv1 import ShuffleNetV1
from kd_jax.models.shufflenetv2 import ShuffleNetV2
from kd_jax.models.vgg import VGG, VGG_BLOCKS
from kd_jax.models.vit import ViT
from kd_jax.models.wrn import WideResNet

_p = functools.partial
_MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _p(CifarResNet, depth=d, widths=(16, 16, 32, 64))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _p(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    "resnet32x4": _p(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    **{f"wrn_{d}_{k}": _p(WideResNet, depth=d, widen_factor=k) for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": _p(VGG, blocks=blocks) for d, blocks in VGG_BLOCKS.items()},
    "mobilenetv2": _p(MobileNetV2, expansion=6, width_mult=0.5),
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
    "convnet": ConvNet,
    "mlp": MLP,
    "vit_tiny": ViT,
    "digits_cnn_teacher": _p(DigitsCNN, widths=(32, 64), pools=(False, True)),
    "digits_cnn_student": _p(DigitsCNN, widths=(16, 32), pools=(True, True)),
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
