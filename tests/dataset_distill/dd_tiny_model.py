"""A tiny conv net for fast dataset-distillation tests (stateless, like MTT's ConvNet)."""
import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import ModelOutput, init_model, make_apply_fn


class TinyConvNet(nn.Module):
  num_classes: int = 3
  width: int = 4
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(self.width, (3, 3), dtype=self.dtype, param_dtype=self.dtype)(x.astype(self.dtype))
    x = nn.relu(nn.GroupNorm(num_groups=self.width, dtype=self.dtype, param_dtype=self.dtype)(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
    return ModelOutput(logits=nn.Dense(self.num_classes, dtype=self.dtype,
                                       param_dtype=self.dtype)(x))


def tiny_model(rng, *, num_classes=3, image_shape=(8, 8, 1), dtype=jnp.float32):
  """Returns (apply_fn, params)."""
  module = TinyConvNet(num_classes=num_classes, dtype=dtype)
  params, _ = init_model(module, rng, (1, *image_shape))
  return make_apply_fn(module), params
