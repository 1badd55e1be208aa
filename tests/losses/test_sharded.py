"""Every loss the generic objective can feed gives the same value and gradient on a batch sharded
over 8 devices as on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax import losses
from kd_jax.losses.utils import masked_mean

FEEDABLE = {"student_logits", "teacher_logits", "labels", "mask", "student_features", "teacher_features"}
NAMES = [n for n in losses.list_losses() if set(losses.get_loss(n).inputs) <= FEEDABLE]
B = 16
# Hyperparameters without a default: ND's teacher class means [C, D], OFD's channel margins [C].
REQUIRED_HPARAMS = {"nd": {"class_means": jnp.asarray(np.random.default_rng(1).normal(size=(10, 32)),
                                                      jnp.float32)},
                    "ofd": {"margin": jnp.full((8,), -0.5)}}


def _inputs(spec, feature_shape):
  rng = np.random.default_rng(0)
  values = {
      "student_logits": rng.normal(size=(B, 10)), "teacher_logits": rng.normal(size=(B, 10)),
      "labels": rng.integers(0, 10, B), "mask": (np.arange(B) < 13).astype(np.float32),
      "student_features": rng.normal(size=(B, *feature_shape)),
      "teacher_features": rng.normal(size=(B, *feature_shape)),
  }
  return [jnp.asarray(values[name], jnp.int32 if name == "labels" else jnp.float32)
          for name in spec.inputs]


def _reduced(spec, *args):
  values = spec.fn(*args, **REQUIRED_HPARAMS.get(spec.name, {}))
  if not spec.per_example:
    return jnp.asarray(values, jnp.float32)
  mask = args[spec.inputs.index("mask")] if "mask" in spec.inputs else None
  return masked_mean(values, mask)


@pytest.mark.parametrize("name", NAMES)
def test_loss_on_8_device_sharded_batch_equals_one_device(name):
  assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
  spec = losses.get_loss(name)
  for feature_shape in ((4, 4, 8), (32,)):
    args = _inputs(spec, feature_shape)
    try:
      expected = _reduced(spec, *args)
    except (ValueError, TypeError):
      continue  # this loss takes the other feature layout
    break
  else:
    pytest.fail(f"{name} accepts neither [B, H, W, C] nor [B, D] features")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in args]
  differentiable = [i for i, n in enumerate(spec.inputs) if n.startswith("student")]

  def loss(*xs):
    return _reduced(spec, *xs)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=differentiable))(*sharded)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss, argnums=differentiable))(*args)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
