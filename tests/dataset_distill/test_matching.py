"""Trajectory matching: exact == unrolled autodiff (f32 and f64, with DSA); tesla == its formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs import dd_digits
from dd_tiny_model import tiny_model
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.matching import (InnerStep, TrajectoryMatcher, make_inner_step, minibatch_plan,
                                             parameter_distance_loss)
from kd_jax.step import cross_entropy

NUM_STEPS, NUM_IMAGES, BATCH_SYN = 2, 4, 2


def _problem(dtype, augment, num_steps=NUM_STEPS):
  apply_fn, params = tiny_model(jax.random.key(0), dtype=dtype)
  theta0, unravel = ravel_pytree(params)
  k = jax.random.split(jax.random.key(1), 4)
  images = jax.random.normal(k[0], (NUM_IMAGES, 8, 8, 1), dtype)
  label_logits = jax.random.normal(k[1], (NUM_IMAGES, 3), dtype)
  target = theta0 + 0.05 * jax.random.normal(k[2], theta0.shape, dtype)
  indices = minibatch_plan(np.random.default_rng(0), NUM_IMAGES, BATCH_SYN, num_steps)
  keys = jax.random.split(k[3], num_steps)
  step = make_inner_step(apply_fn, unravel, label_kind="logits", augment=augment)
  lr = jnp.asarray(0.3, dtype)  # large α·H so that the Hessian terms matter
  return step, (theta0, target, images, label_logits, lr, indices, keys), (apply_fn, unravel)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _dsa(x, key):
  return diff_augment(x, key, strategy="color_crop_cutout_flip_scale_rotate")


@pytest.mark.parametrize("dtype_name,tol", [("float32", 1e-4), ("float64", 1e-9)])
def test_exact_equals_unrolled_with_dsa(dtype_name, tol):
  with jax.enable_x64(dtype_name == "float64"):
    dtype = jnp.dtype(dtype_name)
    step, args, _ = _problem(dtype, _dsa)
    loss_e, exact = TrajectoryMatcher(step, mode="exact", learn_labels=True)(*args)
    loss_u, unrolled = TrajectoryMatcher(step, mode="unrolled", learn_labels=True)(*args)
    assert exact.images.dtype == dtype
    np.testing.assert_allclose(loss_e, loss_u, rtol=tol)
    for name in ("images", "labels", "lr"):
      assert _rel(getattr(exact, name), getattr(unrolled, name)) <= tol, name
      assert float(jnp.linalg.norm(getattr(exact, name))) > 0, name


def test_tesla_matches_its_formula():
  """TESLA: ∂L/∂(X, Y, α) ≈ Σ_i ∂/∂(X, Y, α) ⟨θ_i − α g_i(θ_i; X, Y), λ_N⟩ with θ_i held fixed,
  λ_N = 2(θ_N − θ*)/‖θ_0 − θ*‖². Written here from the per-step gradients g_i directly."""
  flip = lambda x, key: diff_augment(x, key, strategy="flip")
  step, args, (apply_fn, unravel) = _problem(jnp.float32, flip)
  theta0, target, images, label_logits, lr, indices, keys = args
  loss, tesla = TrajectoryMatcher(step, mode="tesla", learn_labels=True)(*args)

  def g(theta, x, y, i):  # the CE gradient of inner step i, from scratch
    def ce(t):
      xb = flip(x[indices[i]], keys[i])
      logits = apply_fn({"params": unravel(t)}, xb, train=False)[0].logits
      return jnp.mean(cross_entropy(logits, jax.nn.softmax(y[indices[i]])))
    return jax.grad(ce)(theta)

  thetas = [theta0]
  for i in range(NUM_STEPS):
    thetas.append(thetas[-1] - lr * g(thetas[-1], images, label_logits, i))
  lam = 2 * (thetas[-1] - target) / jnp.sum((theta0 - target) ** 2)
  np.testing.assert_allclose(loss, parameter_distance_loss(thetas[-1], theta0, target), rtol=1e-5)

  def surrogate(x, y, a):
    return sum(jnp.vdot(-a * g(thetas[i], x, y, i), lam) for i in range(NUM_STEPS))

  want = jax.grad(surrogate, argnums=(0, 1, 2))(images, label_logits, lr)
  for name, w in zip(("images", "labels", "lr"), want):
    assert _rel(getattr(tesla, name), w) <= 1e-4, name


@pytest.mark.parametrize("mode", ["exact", "tesla"])
def test_keeping_every_kth_theta_gives_the_same_gradient(mode):
  # 5 steps: blocks of 2 (θ_0, θ_2, θ_4 kept, θ_1 and θ_3 recomputed) and of 3 (θ_0, θ_3).
  step, args, _ = _problem(jnp.float32, None, num_steps=5)
  loss_all, all_kept = TrajectoryMatcher(step, mode=mode, learn_labels=True)(*args)
  for k in (2, 3, 5, 8):
    loss_k, grads_k = TrajectoryMatcher(step, mode=mode, learn_labels=True, keep_every=k)(*args)
    np.testing.assert_allclose(loss_k, loss_all, rtol=1e-6)
    for name in ("images", "labels", "lr"):
      np.testing.assert_allclose(getattr(grads_k, name), getattr(all_kept, name), rtol=1e-5,
                                 atol=1e-8, err_msg=f"{name}, keep_every={k}")
  if mode == "exact":  # and the exact gradient is still full autodiff's
    _, unrolled = TrajectoryMatcher(step, mode="unrolled", learn_labels=True)(*args)
    assert _rel(grads_k.images, unrolled.images) <= 1e-4
  with pytest.raises(ValueError, match="keep_every"):
    TrajectoryMatcher(step, mode=mode, learn_labels=True, keep_every=0)


def test_minibatch_plan_is_chunked_permutations():
  plan = minibatch_plan(np.random.default_rng(0), 6, 2, 7)
  assert plan.shape == (7, 2)
  np.testing.assert_array_equal(np.sort(plan[:3].ravel()), np.arange(6))
  np.testing.assert_array_equal(np.sort(plan[3:6].ravel()), np.arange(6))
  with pytest.raises(ValueError, match="batch_syn"):
    minibatch_plan(np.random.default_rng(0), 6, 4, 2)


def test_bad_mode_and_label_kind_raise():
  with pytest.raises(ValueError, match="mode"):
    TrajectoryMatcher(lambda *a: None, mode="approx")
  with pytest.raises(ValueError, match="label_kind"):
    make_inner_step(None, None, label_kind="onehot")


class _WeightDecayStep(InnerStep):
  """SGD with decoupled weight decay: θ − α·(∇ℓ + wd·θ), an update the exact pass does not see."""

  def __call__(self, theta, images, labels, lr, indices, key):
    return super().__call__(theta, images, labels, lr, indices, key) - lr * 0.5 * theta


def test_exact_and_tesla_refuse_an_inner_step_with_its_own_update():
  step, args, _ = _problem(jnp.float32, None)
  decayed = _WeightDecayStep(step.loss, step.label_kind)
  for mode in ("exact", "tesla"):
    with pytest.raises(ValueError, match="use mode='unrolled'"):
      TrajectoryMatcher(decayed, mode=mode, learn_labels=True)
  # Unrolled autodiff sees the whole update: its gradient is the decayed trajectory's.
  _, unrolled = TrajectoryMatcher(decayed, mode="unrolled", learn_labels=True)(*args)
  _, plain = TrajectoryMatcher(step, mode="unrolled", learn_labels=True)(*args)
  assert _rel(unrolled.images, plain.images) > 1e-3


def test_label_kind_and_learn_labels_must_agree():
  step, _, (apply_fn, unravel) = _problem(jnp.float32, None)
  with pytest.raises(ValueError, match="learn_labels=False would drop their gradient"):
    TrajectoryMatcher(step, mode="exact", learn_labels=False)
  hard = make_inner_step(apply_fn, unravel, label_kind="hard")
  with pytest.raises(ValueError, match="label_kind='hard' labels are class ids"):
    TrajectoryMatcher(hard, mode="exact", learn_labels=True)
  TrajectoryMatcher(make_inner_step(apply_fn, unravel, label_kind="probs"), mode="exact")


def test_distill_job_rejects_a_model_with_batch_stats(tmp_path, digits_data_dir):
  config = dd_digits.get_config("runlocal")
  with config.unlocked():
    config.data.data_dir = digits_data_dir
    config.model.kwargs.norm = "batchnorm"
  with pytest.raises(ValueError, match="model.name='convnet'.*mutable state \\(batch_stats\\)"):
    run_lib.run(config, tmp_path)
