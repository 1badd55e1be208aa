"""k-bit quantization with a straight-through estimator: grid, gradients, learned points, size,
export (Polino et al., ICLR 2018)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import quantization
from kd_jax.distiller import supervised
from kd_jax.models.output import ModelOutput
from kd_jax.step import make_train_step, TrainState

PARAMS = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (7, 9)),
                    "bias": jnp.linspace(-1.0, 2.0, 9)}}


def _buckets(x, size):
  flat = np.ravel(np.asarray(x, np.float64))
  return [flat[i:i + size] for i in range(0, flat.size, size)]


@pytest.mark.parametrize("bits", [1, 4])
def test_values_lie_on_each_buckets_grid_and_round_trip(bits):
  quantizer = quantization.Quantizer(bits, bucket_size=16)
  quantized = quantizer(PARAMS)
  levels = 2 ** bits - 1
  for w, q in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(quantized)):
    for wb, qb in zip(_buckets(w, 16), _buckets(q, 16)):
      low, span = wb.min(), wb.max() - wb.min()
      steps = (qb - low) / span * levels
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # on the grid
      assert steps.min() > -1e-4 and steps.max() < levels + 1e-4
      assert np.abs(qb - wb).max() <= span / (2 * levels) + 1e-6  # nearest grid point
      np.testing.assert_allclose([qb.min(), qb.max()], [wb.min(), wb.max()], atol=1e-6)
  again = jax.jit(lambda q: quantizer.decode(quantizer.encode(q)))(quantized)  # a fixed point
  for path, q in (("dense/kernel", quantized["dense"]["kernel"]),
                  ("dense/bias", quantized["dense"]["bias"])):
    np.testing.assert_allclose(again[path], q, atol=1e-6)


def test_sixteen_bits_is_full_precision_up_to_the_resolution():
  quantized = quantization.Quantizer(16, bucket_size=256)(PARAMS)
  for w, q in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(quantized)):
    assert np.abs(np.asarray(q) - np.asarray(w)).max() <= np.ptp(w) / (2 * 65535) + 1e-7


def _linear(variables, x, *, train, rngs=None):
  """A plain-function student `[B, 7] -> [B, 9]` on PARAMS (any apply function works)."""
  del train, rngs
  p = variables["params"]["dense"]
  return ModelOutput(logits=x @ p["kernel"] + p["bias"], features={}), {}


BATCH = {"image": jax.random.normal(jax.random.PRNGKey(2), (6, 7)),
         "label": jnp.array([0, 1, 2, 3, 4, 8]), "mask": jnp.ones(6)}


def test_step_applies_the_gradient_at_the_quantized_weights_to_the_shadows():
  quantizer = quantization.Quantizer(2, bucket_size=8)
  method = quantization.Quantized(supervised(_linear), quantizer)
  trainable, frozen, extra = method.init(jax.random.PRNGKey(0), {"student": {"params": PARAMS}},
                                         BATCH)
  assert set(trainable) == {"student"}
  tx = optax.sgd(0.5)
  step, plain_step = (make_train_step(m, tx) for m in (method, supervised(_linear)))

  @jax.jit
  def updates(state, at_quantized):  # one step from w with STE, one plain step from Q(w)
    return (step(state, BATCH, jax.random.PRNGKey(3))[0].trainable["student"],
            plain_step(at_quantized, BATCH, jax.random.PRNGKey(3))[0].trainable["student"])

  quantized = quantizer(PARAMS)
  shadows, plain = updates(TrainState.create(tx, trainable, frozen, extra),
                           TrainState.create(tx, {"student": quantized}, frozen, extra))
  for w, q, new_w, new_q in zip(*map(jax.tree.leaves, (PARAMS, quantized, shadows, plain))):
    np.testing.assert_allclose(new_w - w, new_q - q, rtol=1e-5, atol=1e-6)  # the same −lr·∇L(Q(w))
    assert np.abs(np.asarray(new_w - w)).max() > 0




def test_full_precision_leaves_are_left_alone():
  quantizer = quantization.Quantizer(2, full_precision="bias$")
  assert quantizer.quantized_paths(PARAMS) == ["dense/kernel"]
  quantized = quantizer(PARAMS)
  np.testing.assert_array_equal(quantized["dense"]["bias"], PARAMS["dense"]["bias"])
  assert len(np.unique(quantized["dense"]["kernel"])) <= 4
  everything = quantization.Quantized(supervised(_linear), quantization.Quantizer(2, 256, "."))
  with pytest.raises(ValueError, match=r"student.quantize.full_precision='.' matches every "
                                       r"parameter of the student; nothing would be quantized"):
    everything.init(jax.random.PRNGKey(0), {"student": {"params": PARAMS}}, BATCH)


def test_size_in_bits_counts_codes_scaling_points_and_kept_leaves():
  params = {"a": jnp.zeros(300), "b": jnp.zeros((2, 3))}
  # a: 300 codes of 4 bits, 2 buckets of (scale, offset) in float32; b: 6 float32.
  assert quantization.Quantizer(4, 256, "^b$").size_bits(params) == 300 * 4 + 2 * 64 + 6 * 32
  learned = quantization.Quantizer(4, 256, "^b$", learned_points=True)
  assert learned.size_bits(params) == 300 * 4 + 2 * 64 + 16 * 32 + 6 * 32
  assert quantization.model_bits(params) == 306 * 32


def test_learned_points_start_uniform_and_get_the_scaled_gradient_of_their_weights():
  quantizer = quantization.Quantizer(3, bucket_size=16, learned_points=True)
  points = quantizer.init_points(PARAMS)
  w = PARAMS["dense"]["kernel"]

  @jax.jit
  def everything(points):  # one compilation
    # L = Σ q·cos(w) over the kernel: ∂L/∂p_i = Σ over the values coded i of α_bucket·cos(w).
    grads = jax.grad(lambda p: jnp.sum(quantizer(PARAMS, p)["dense"]["kernel"] * jnp.cos(w)))
    return (quantizer(PARAMS, points), quantizer(PARAMS), grads(points),
            quantizer.encode(PARAMS, points)["dense/kernel"])

  learned, uniform, grads, (codes, scale, _) = everything(points)
  for a, b in zip(jax.tree.leaves(learned), jax.tree.leaves(uniform)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  per_value = np.cos(np.asarray(w)).ravel() * np.repeat(np.asarray(scale), 16)[:w.size]
  expected = np.bincount(np.asarray(codes).ravel(), per_value, minlength=8)
  np.testing.assert_allclose(grads["dense"]["kernel"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads["dense"]["bias"], 0)


def test_points_stay_sorted_in_the_unit_interval_after_an_update():
  quantizer = quantization.Quantizer(2, learned_points=True)
  method = quantization.Quantized(supervised(_linear), quantizer)
  moved = jax.tree.map(lambda p: jnp.array([1.3, 0.6, 0.2, -0.1]), quantizer.init_points(PARAMS))
  state = TrainState.create(optax.sgd(0.1), {"student": PARAMS, quantization.POINTS: moved})
  after = method.after_update(state, state)
  for p in jax.tree.leaves(after.trainable[quantization.POINTS]):
    np.testing.assert_allclose(p, [0.0, 0.2, 0.6, 1.0])


@pytest.mark.parametrize("learned", [False, True])
def test_export_holds_integer_codes_and_loads_to_the_quantized_weights(tmp_path, learned):
  quantizer = quantization.Quantizer(4, bucket_size=16, full_precision="bias$",
                                     learned_points=learned)
  points = quantizer.init_points(PARAMS) if learned else None
  if learned:  # non-uniform points
    points = jax.tree.map(lambda p: p ** 2, points)
  path = str(tmp_path / "quantized.npz")
  quantization.export(path, quantizer, PARAMS, points)
  with np.load(path) as f:
    assert f["dense/kernel.codes"].dtype == np.uint8 and f["dense/kernel.codes"].max() < 16
    assert f["dense/kernel.scale"].shape == (4,) and ("dense/kernel.points" in f) == learned
  loaded = quantization.load(path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(quantizer(PARAMS, points))):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 0}, r"bits must be in 1..16 \(0 turns quantization off\), got 0"),
    ({"bits": 17}, r"bits must be in 1..16"),
    ({"bits": 4, "bucket_size": 0}, r"bucket_size must be >= 1, got 0"),
    ({"bits": 4, "full_precision": "(head"}, r"full_precision='\(head' is not a regex"),
])
def test_bad_settings_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    quantization.Quantizer(**kwargs)
