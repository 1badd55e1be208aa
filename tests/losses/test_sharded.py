"""Every loss fed from logits, labels and features (plus replicated constants such as ND's class
means) gives the same value and gradient on a batch sharded over 8 devices as on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax import losses
from kd_jax.losses.utils import masked_mean

B = 16
# Inputs other than the batch ones (replicated): ND's teacher class means [C, D].
CONSTANTS = {"class_means": np.random.default_rng(1).normal(size=(10, 32))}
# Hyperparameters without a default: OFD's channel margins [C].
REQUIRED_HPARAMS = {"ofd": {"margin": jnp.full((8,), -0.5)}}
FEEDABLE = {"student_logits", "teacher_logits", "labels", "student_features", "teacher_features",
            *CONSTANTS}
NAMES = [n for n in losses.list_losses() if set(losses.get_loss(n).inputs) <= FEEDABLE]
MASK = jnp.asarray(np.arange(B) < 13, jnp.float32)


def _inputs(spec, feature_shape):
  rng = np.random.default_rng(0)
  values = {
      "student_logits": rng.normal(size=(B, 10)), "teacher_logits": rng.normal(size=(B, 10)),
      "labels": rng.integers(0, 10, B),
      "student_features": rng.normal(size=(B, *feature_shape)),
      "teacher_features": rng.normal(size=(B, *feature_shape)), **CONSTANTS,
  }
  args = [jnp.asarray(values[name], jnp.int32 if name == "labels" else jnp.float32)
          for name in spec.inputs]
  if spec.name == "fsp":  # each side is a pair of maps (a stage's input and output)
    args = [(x, jnp.square(x)) for x in args]
  return args


def _reduced(spec, mask, *args):
  hparams = dict(REQUIRED_HPARAMS.get(spec.name, {}))
  if spec.takes_mask:
    hparams["mask"] = mask
  values = spec.fn(*args, **hparams)
  if not spec.per_example:
    return jnp.asarray(values, jnp.float32)
  return masked_mean(values, mask)


@pytest.mark.parametrize("name", NAMES)
def test_loss_on_8_device_sharded_batch_equals_one_device(name):
  assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
  spec = losses.get_loss(name)
  for feature_shape in ((4, 4, 8), (32,)):
    args = _inputs(spec, feature_shape)
    try:
      expected = _reduced(spec, MASK, *args)
    except (ValueError, TypeError):
      continue  # this loss takes the other feature layout
    break
  else:
    pytest.fail(f"{name} accepts neither [B, H, W, C] nor [B, D] features")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  sharded = [a if name in CONSTANTS else jax.device_put(a, batch_sharding)
             for name, a in zip(spec.inputs, args)]
  sharded_mask = jax.device_put(MASK, batch_sharding)
  differentiable = [i + 1 for i, n in enumerate(spec.inputs) if n.startswith("student")]

  def loss(mask, *xs):
    return _reduced(spec, mask, *xs)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=differentiable))(sharded_mask, *sharded)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss, argnums=differentiable))(MASK, *args)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
