"""ConvNet (MTT): shapes, parameter count, statelessness and its norm/pooling options."""
import jax
import jax.numpy as jnp
import pytest

from kd_jax.models import ConvNet, count_params, create_model, init_model, make_apply_fn


def test_convnet3_matches_mtt_shapes_and_param_count():
  model = create_model("convnet", num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                                                train=False))
  # MTT's ConvNet-3 on CIFAR-10 (3·9·128+128 + 2·(128·9·128+128) + 3·256 + 2048·10+10).
  assert count_params(variables["params"]) == 320_010
  assert set(variables) == {"params"}  # instance norm: no BatchNorm state
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=True), variables)
  assert out.features["stage3"].shape == (2, 4, 4, 128)
  assert out.features["pre_logits"].shape == (2, 2048)
  assert out.logits.shape == (2, 10)


def test_instance_norm_makes_each_example_scale_invariant(key):
  # Instance norm removes each example's per-channel scale and the conv bias, so scaling
  # one example's input by a > 0 leaves its output unchanged (batch norm would not).
  model = ConvNet(num_classes=3, depth=2, width=8)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  params, state = init_model(model, key, x.shape)
  apply_fn = jax.jit(make_apply_fn(model), static_argnames="train")
  out, _ = apply_fn({"params": params, **state}, x, train=False)
  scaled, _ = apply_fn({"params": params, **state}, x * jnp.array([7.0, 0.5])[:, None, None, None],
                       train=False)
  assert jnp.allclose(out.logits, scaled.logits, atol=1e-4)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "groupnorm", "none"])
@pytest.mark.parametrize("pooling", ["maxpooling", "none"])
def test_norm_and_pooling_options_run_on_digits(norm, pooling):
  model = create_model("convnet", num_classes=10, depth=2, width=8, norm=norm, pooling=pooling)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)),
                                                train=False))
  assert ("batch_stats" in variables) == (norm == "batchnorm")
  side = 2 if pooling != "none" else 8
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 8, 8, 1)), train=False), variables)
  assert out.features["stage2"].shape == (2, side, side, 8)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="norm='bn'"):
    ConvNet(num_classes=3, norm="bn").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
