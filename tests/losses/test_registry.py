"""The registry contract, checked on every registered loss: names and exports agree, inputs are
positional (student first), `mask` and hyperparameters keyword-only, every loss jits and
differentiates, and float hyperparameters may be traced."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd_jax.losses
from kd_jax import losses
from kd_jax.losses import modules as M
from kd_jax.losses.features import l2_normalize

from reference_fixtures import normal

B, C, D = 4, 5, 6
INPUT_NAMES = {
    "student_logits", "teacher_logits", "labels", "weak_logits", "class_means",
    "student_features", "teacher_features", "student_mean", "student_variance",
    "student_log_variance", "student_factor", "teacher_factor",
    "student_embedding", "teacher_embedding", "memory", "indices", "contrast_indices",
    "student_scores", "teacher_scores", "student_values", "teacher_values",
    "student_states", "teacher_states",
}
# Hyperparameters without a default, and structural ones set to reach every float
# hyperparameter (CKA's threshold only acts with the RBF kernel).
HPARAMS = {"minilmv2_relation": {"num_relation_heads": 2}, "ofd": {"margin": -0.5 * jnp.ones(3)},
           "cka": {"kernel": "rbf"}}


def example_call(name):
  """`(args, kwargs)` for a small call of the registered loss `name` (with a padded example)."""
  spec = losses.get_loss(name)
  fmap_s, fmap_t = normal(1, (B, 4, 4, 3)), normal(2, (B, 4, 4, 3))
  embed_s, embed_t = l2_normalize(normal(3, (B, D))), l2_normalize(normal(4, (B, D)))
  indices = jnp.array([3, 7, 1, 9], jnp.int32)
  values = {
      "student_logits": 2 * normal(5, (B, C)), "teacher_logits": 2 * normal(6, (B, C)),
      "weak_logits": normal(7, (B, C)), "labels": jnp.array([0, 3, 1, 4]),
      "class_means": normal(8, (C, D)),
      "student_features": fmap_s, "teacher_features": fmap_t,
      "student_mean": fmap_s, "student_variance": jnp.full((3,), 1.5),
      "student_log_variance": 0.1 * normal(9, (B, 48)),
      "student_factor": fmap_s, "teacher_factor": fmap_t,
      "student_embedding": embed_s, "teacher_embedding": embed_t,
      "memory": M.init_crd_memory(jax.random.key(0), 12, D), "indices": indices,
      "contrast_indices": M.crd_contrast_indices(jax.random.key(1), indices, 5, 12),
      "student_scores": normal(10, (B, 2, 3, 3)), "teacher_scores": normal(11, (B, 2, 3, 3)),
      "student_values": normal(12, (B, 2, 3, 4)), "teacher_values": normal(13, (B, 2, 3, 5)),
      "student_states": normal(14, (B, 3, 8)), "teacher_states": normal(15, (B, 3, 10)),
  }
  if name == "nd":
    values["student_features"], values["teacher_features"] = normal(16, (B, D)), normal(17, (B, D))
  if name == "fsp":
    values["student_features"] = (fmap_s, normal(18, (B, 2, 2, 5)))
    values["teacher_features"] = (fmap_t, normal(19, (B, 2, 2, 5)))
  if name == "meal_v2_discriminator":
    values["student_scores"], values["teacher_scores"] = normal(20, (B, 2)), normal(21, (B, 2))
  kwargs = dict(HPARAMS.get(name, {}))
  if spec.takes_mask:
    per_token = spec.kind == "attention"
    kwargs["mask"] = jnp.array([[1, 1, 0]] * (B - 1) + [[1, 0, 0]]) if per_token else \
        jnp.array([1, 1, 0, 1])
  return tuple(values[n] for n in spec.inputs), kwargs


def _loss_value(out):
  return out[0] if isinstance(out, tuple) else out  # CRD also returns its memory


NAMES = losses.list_losses()


@pytest.mark.parametrize("name", NAMES)
def test_registry_name_is_the_exported_function(name):
  spec = losses.get_loss(name)
  assert getattr(kd_jax.losses, name) is spec.fn
  assert losses.get_loss(spec.fn.__name__) is spec
  assert spec.paper and spec.reference and spec.kind in ("logits", "features", "relations",
                                                         "attention")


@pytest.mark.parametrize("name", NAMES)
def test_signature_follows_the_contract(name):
  spec = losses.get_loss(name)
  assert set(spec.inputs) <= INPUT_NAMES, spec.inputs
  assert spec.inputs[0].startswith("student_")
  assert spec.inputs[1].startswith("teacher_") or spec.inputs[1] == "weak_logits"
  params = inspect.signature(spec.fn).parameters
  if spec.takes_mask:
    assert params["mask"].kind == inspect.Parameter.KEYWORD_ONLY
    assert params["mask"].default is None
  assert all(params[h].kind == inspect.Parameter.KEYWORD_ONLY for h in spec.hparams)


def test_lookup_errors_name_the_loss_and_its_hyperparameters():
  assert losses.get_loss("attention_transfer").name == "at"
  with pytest.raises(ValueError, match="unknown loss 'kdd'; valid names: .*kd"):
    losses.get_loss("kdd")
  spec = losses.get_loss("kd")
  spec.check_hparams({"temperature": 2.0})
  with pytest.raises(ValueError, match=r"loss 'kd' does not take 'temprature'; its "
                                       r"hyperparameters are: temperature=4.0"):
    spec.check_hparams({"temprature": 2.0})
  with pytest.raises(ValueError, match="needs 'num_relation_heads'"):
    losses.get_loss("minilmv2_relation").check_hparams({})
  with pytest.raises(ValueError, match=r"\(none\)"):
    losses.get_loss("fitnet").check_hparams({"temperature": 1.0})


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_loss_jits_and_differentiates(name):
  spec = losses.get_loss(name)
  args, kwargs = example_call(name)
  out = _loss_value(jax.jit(lambda *a: spec.fn(*a, **kwargs))(*args))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert out.shape[:1] == (B,) if spec.per_example else out.shape == ()

  def total(student):
    return jnp.sum(_loss_value(spec.fn(student, *args[1:], **kwargs)))

  grad = jax.jit(jax.grad(total))(args[0])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))


def _float_hparams(spec):
  return {h: 1.5 * v for h, v in spec.hparams.items() if type(v) is float}


@pytest.mark.parametrize("name", [n for n in NAMES if _float_hparams(losses.get_loss(n))])
def test_float_hyperparameters_may_be_traced(name):
  spec = losses.get_loss(name)
  args, kwargs = example_call(name)
  hparams = _float_hparams(spec)
  traced = jax.jit(lambda h: spec.fn(*args, **kwargs, **h))(hparams)
  untraced = spec.fn(*args, **kwargs, **hparams)
  for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(untraced)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_traced_temperature_is_not_checked_but_a_concrete_one_is():
  s, t = normal(0, (B, C)), normal(1, (B, C))
  np.testing.assert_allclose(jax.jit(lambda T: losses.kd(s, t, temperature=T))(4.0),
                             losses.kd(s, t, temperature=4.0), rtol=1e-6)
  with pytest.raises(ValueError, match="kd: temperature must be > 0, got 0.0"):
    losses.kd(s, t, temperature=0.0)


@pytest.mark.parametrize("name", [n for n in NAMES if losses.get_loss(n).takes_mask])
def test_an_all_ones_mask_changes_nothing(name):
  spec = losses.get_loss(name)
  args, kwargs = example_call(name)
  ones = jnp.ones_like(kwargs.pop("mask"))
  fn = jax.jit(lambda mask: spec.fn(*args, **kwargs, mask=mask))
  for a, b in zip(jax.tree.leaves(fn(ones)), jax.tree.leaves(fn(None))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
