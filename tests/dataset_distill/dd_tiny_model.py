"""A tiny conv net for fast dataset-distillation tests (stateless, like MTT's ConvNet)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
                                       param_dtype=self.dtype)(x), features={"pre_logits": x})


def tiny_model(rng, *, num_classes=3, image_shape=(8, 8, 1), dtype=jnp.float32):
  """Returns (apply_fn, params)."""
  module = TinyConvNet(num_classes=num_classes, dtype=dtype)
  params, _ = init_model(module, rng, (1, *image_shape))
  return make_apply_fn(module), params


def tiny_problem(num_images=12):
  """(apply_fn, init_params, images `[num_images, 8, 8, 1]`, labels cycling over 3 classes)."""
  apply_fn, _ = tiny_model(jax.random.key(0))
  init_params = lambda key: init_model(TinyConvNet(num_classes=3), key, (1, 8, 8, 1))[0]
  images = np.random.default_rng(0).standard_normal((num_images, 8, 8, 1)).astype(np.float32)
  return apply_fn, init_params, images, np.arange(num_images, dtype=np.int32) % 3
