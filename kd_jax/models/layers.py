"""Building blocks shared by the zoo: PyTorch-matching initialisers, BatchNorm and pooling.

The CIFAR references (RepDistiller, mdistiller) initialise convolutions with
N(0, 2 / (k·k·out_channels)) (He, fan-out) and use PyTorch's BatchNorm2d
(momentum 0.1 on the running average, i.e. 0.9 here, eps 1e-5). Other layers use
PyTorch's default U(±1/sqrt(fan_in)) weight; biases start at zero.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

he_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, groups: int = 1,
         use_bias: bool = False, name: str | None = None) -> nn.Conv:
  """PyTorch-style `Conv2d(kernel, stride, padding=kernel // 2, groups)` with He fan-out init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=use_bias, kernel_init=he_fan_out_init,
                 dtype=dtype, name=name)


def batch_norm(*, train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """PyTorch's BatchNorm2d defaults: running stats in `batch_stats`, momentum 0.9, eps 1e-5.

  One difference: the running variance averages the biased batch variance (PyTorch uses
  the unbiased one, larger by n / (n − 1) for n values per channel).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def classifier(num_classes: int, dtype: Dtype, name: str = "head") -> nn.Dense:
  """The final linear layer; callers cast its output to float32."""
  return nn.Dense(num_classes, dtype=dtype, kernel_init=torch_default_init, name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """`[B, H, W, C] -> [B, C]`, the adaptive average pool the references end with."""
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's channel shuffle on NHWC: channel `a·(C/g) + b` moves to `b·g + a`."""
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)
