"""Every registered model: the apply-fn contract, feature taps, reference parameter counts.

Shapes, dtypes and parameter counts are checked with `jax.eval_shape` (tracing only, no
compilation); numerics and BatchNorm state updates are run on a few small models.
"""
import jax
import jax.numpy as jnp
import pytest

from kd_jax.models import count_params, create_model, init_model, list_models, make_apply_fn

# Parameter counts of the PyTorch references at 100 classes (3-channel 32×32 input), read by
# instantiating RepDistiller's `models/` (HobbitLong/RepDistiller) and summing `numel()`.
REFERENCE_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
}
DIGITS_ONLY = ("digits_cnn_teacher", "digits_cnn_student")
TWO_STAGE = DIGITS_ONLY  # two conv blocks, hence only stage1 and stage2


def _input_shape(name):
  return (2, 8, 8, 1) if name in DIGITS_ONLY else (2, 32, 32, 3)


def _abstract_run(model, input_shape, *, train):
  """(params, model_state, output, new_state) as ShapeDtypeStructs, through the public contract."""
  def run():
    params, state = init_model(model, jax.random.key(0), input_shape)
    out, new_state = make_apply_fn(model)({"params": params, **state}, jnp.zeros(input_shape),
                                          train=train, rngs={"dropout": jax.random.key(1)})
    return params, state, out, new_state
  return jax.eval_shape(run)


def test_every_cifar_reference_is_registered():
  assert set(REFERENCE_PARAMS) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_contract_shapes_and_param_counts(name):
  model = create_model(name, num_classes=100)
  params, state, out, new_state = _abstract_run(model, _input_shape(name), train=True)
  if name in REFERENCE_PARAMS:
    assert count_params(params) == REFERENCE_PARAMS[name]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert out.logits.shape == (2, 100) and out.logits.dtype == jnp.float32
  expected = {"stage1", "stage2", "pre_logits"} | ({"stage3"} if name not in TWO_STAGE else set())
  assert expected <= set(out.features)
  assert out.features["pre_logits"].ndim == 2 and out.features["pre_logits"].shape[0] == 2
  for tap, feature in out.features.items():
    assert feature.shape[0] == 2, tap
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("name", ["resnet8x4", "convnet", "wrn_16_1", "vgg8", "mobilenetv2",
                                  "shufflenetv2", "mlp", "digits_cnn_student"])
def test_runs_on_8x8_single_channel_digits(name):
  model = create_model(name, num_classes=10)
  _, _, out, _ = _abstract_run(model, (2, 8, 8, 1), train=False)
  assert out.logits.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet32x4", "wrn_40_2", "shufflenetv1", "vit_tiny", "convnet"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model = create_model(name, num_classes=10, dtype=jnp.bfloat16)
  params, _, out, _ = _abstract_run(model, (2, 32, 32, 3), train=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert out.logits.dtype == jnp.float32
  assert out.features["stage2"].dtype == jnp.bfloat16


def _batch_stats_change(old, new):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(old["batch_stats"]), jax.tree.leaves(new["batch_stats"])))


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet8", {}, (2, 32, 32, 3)),
    ("convnet", {"norm": "batchnorm", "depth": 2, "width": 8}, (2, 8, 8, 1)),
])
def test_train_mode_updates_batch_stats_and_eval_mode_does_not(name, kwargs, shape, key):
  model = create_model(name, num_classes=10, **kwargs)
  params, state = init_model(model, key, shape)
  apply_fn = jax.jit(make_apply_fn(model), static_argnames="train")
  x = jax.random.normal(jax.random.key(1), shape) + 1.0
  variables = {"params": params, **state}
  train_out, train_state = apply_fn(variables, x, train=True)
  eval_out, eval_state = apply_fn(variables, x, train=False)
  assert _batch_stats_change(state, train_state) > 1e-3
  assert _batch_stats_change(state, eval_state) == 0.0
  assert bool(jnp.all(jnp.isfinite(train_out.logits)))
  assert bool(jnp.all(jnp.isfinite(eval_out.logits)))
  # Batch statistics differ from the fresh running ones, so the two modes disagree.
  assert not jnp.allclose(train_out.logits, eval_out.logits)


@pytest.mark.parametrize("name, kwargs", [("resnet8", {}),
                                          ("shufflenetv2", {"num_blocks": (1, 1, 1)})])
def test_post_activation_taps_are_relu_of_preact_taps(name, kwargs, key):
  model = create_model(name, num_classes=10, **kwargs)
  params, state = init_model(model, key, (2, 16, 16, 3))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  out, _ = jax.jit(make_apply_fn(model), static_argnames="train")(
      {"params": params, **state}, x, train=False)
  for k in (1, 2, 3):
    post, pre = out.features[f"stage{k}"], out.features[f"stage{k}_preact"]
    if name == "shufflenetv2":  # the reference's preact tap is taken before the channel shuffle
      c = pre.shape[-1]
      pre = pre.reshape(*pre.shape[:-1], 2, c // 2).swapaxes(-1, -2).reshape(pre.shape)
    assert jnp.allclose(post, jax.nn.relu(pre)), k
    assert bool(jnp.any(pre < 0)), k  # the taps really differ


def test_vit_attention_is_a_distribution_and_dropout_uses_the_rng(key):
  model = create_model("vit_tiny", num_classes=10, patch_size=2, hidden_dim=32, num_heads=4,
                       mlp_dim=64, depth=2, dropout_rate=0.5)
  params, state = init_model(model, key, (2, 8, 8, 1))
  apply_fn = jax.jit(make_apply_fn(model), static_argnames="train")
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  out, _ = apply_fn({"params": params}, x, train=False)
  assert out.features["attn/1"].shape == (2, 4, 16, 16)
  assert out.features["values/1"].shape == (2, 4, 16, 8)
  assert out.features["stage2"].shape == (2, 4, 4, 32)
  assert jnp.allclose(out.features["attn/0"].sum(-1), 1.0, atol=1e-5)
  run = lambda seed: apply_fn({"params": params}, x, train=True,
                              rngs={"dropout": jax.random.key(seed, impl="rbg")})[0].logits
  assert jnp.array_equal(run(3), run(3))
  assert not jnp.allclose(run(3), run(4))
  with pytest.raises(ValueError, match="patch_size=3"):
    create_model("vit_tiny", num_classes=10, patch_size=3).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_registry_rejects_unknown_names_and_fields():
  with pytest.raises(ValueError, match="unknown model 'resnet9'; valid names: .*resnet8x4"):
    create_model("resnet9", num_classes=10)
  with pytest.raises(ValueError, match="no field.*'widht'"):
    create_model("convnet", num_classes=10, widht=64)
  with pytest.raises(ValueError, match="6n\\+2.*got 10"):
    create_model("resnet8", num_classes=10, depth=10).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert list_models() == sorted(list_models())
