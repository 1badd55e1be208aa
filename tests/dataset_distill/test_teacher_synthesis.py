"""Teacher-driven synthesis: SRe2L recovery, RDED patch selection, INFER compensators."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.dataset_distill.feature_compensator import INFER, infer_budget
from kd_jax.dataset_distill.method import Context, Teacher
from kd_jax.dataset_distill.patch_selection import RDED, crop_patches, pad_center, stitch
from kd_jax.dataset_distill.recovery import (SRe2LRecovery, bn_inputs, bn_statistics_loss,
                                             crop_flip, draw_resized_crop, pixel_range,
                                             recovery_optimizer)
from kd_jax.models import ModelOutput, create_model, init_model, make_apply_fn

C, H = 3, 8


@functools.lru_cache(maxsize=None)
def bn_problem():
  """A depth-1 BatchNorm ConvNet with running statistics set by hand (away from any batch's),
  and 8×8×1 data, 8 images per class."""
  module = create_model("convnet", num_classes=C, depth=1, width=4, norm="batchnorm")
  params, _ = init_model(module, jax.random.key(0), (1, H, H, 1))
  stats = {"BatchNorm_0": {"mean": jnp.array([0.1, -0.2, 0.3, 0.05]),
                           "var": jnp.array([0.5, 1.5, 0.8, 1.2])}}
  rng = np.random.default_rng(0)
  images = rng.standard_normal((8 * C, H, H, 1)).astype(np.float32)
  labels = np.arange(8 * C, dtype=np.int32) % C
  return make_apply_fn(module), {"params": params, "batch_stats": stats}, images, labels


def context(teacher=None, *, ipc=2, seed=0, images=None, labels=None):
  apply_fn, variables, real, real_labels = bn_problem()
  teacher = teacher or Teacher(apply_fn, variables)
  return Context(train_images=real if images is None else images,
                 train_labels=real_labels if labels is None else labels, num_classes=C, ipc=ipc,
                 apply_fn=None, init_params=None, augment=None, teacher=teacher, seed=seed,
                 workdir=None)


def first_conv(variables, x):
  """The input of the first BatchNorm, computed without the model: conv3×3 'SAME' + bias."""
  return nn.Conv(4, (3, 3), padding="SAME").apply({"params": variables["params"]["Conv_0"]}, x)


def hand_bn_loss(z, stats, multiplier=10.0):
  """R_BN of one batch of first-BN inputs z `[B, H, W, F]` (the only BN layer)."""
  mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
  return multiplier * (jnp.linalg.norm(var - stats["var"]) + jnp.linalg.norm(mean - stats["mean"]))


# --- BN statistics ---------------------------------------------------------------------------

def test_bn_statistics_loss_matches_hand_computation_and_vanishes_at_batch_stats():
  apply_fn, variables, images, _ = bn_problem()
  x = jnp.asarray(images[:6])
  stats = variables["batch_stats"]["BatchNorm_0"]
  paths = []

  @jax.jit
  def check(x):
    _, captured = bn_inputs(apply_fn, variables, x)
    paths.extend(path for path, _ in captured)
    z = first_conv(variables, x)
    got = bn_statistics_loss(captured, variables["batch_stats"], first_bn_multiplier=10.0,
                             groups=2)
    want = jnp.stack([hand_bn_loss(z[:3], stats), hand_bn_loss(z[3:], stats)])
    # Running stats equal to the batch's own statistics: zero loss, finite gradient.
    own = {"BatchNorm_0": {"mean": z.mean((0, 1, 2)), "var": z.var((0, 1, 2))}}
    own_vars = {**variables, "batch_stats": own}
    at_own = bn_statistics_loss(captured, own)
    grad = jax.grad(lambda x: bn_statistics_loss(bn_inputs(apply_fn, own_vars, x)[1],
                                                 own).sum())(x)
    return captured[0][1], z, got, want, at_own, grad

  captured, z, got, want, at_own, grad = check(x)
  assert paths == [("BatchNorm_0",)]
  np.testing.assert_allclose(captured, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got.min()) > 0.1
  assert float(at_own[0]) == pytest.approx(0.0, abs=1e-5)
  assert np.all(np.isfinite(grad))
  # An exactly zero difference (constant channels, var 0) has gradient 0, not NaN.
  flat = jnp.full((2, 2, 2, 4), 0.5)
  exact = {"BN": {"mean": jnp.full((4,), 0.5), "var": jnp.zeros(4)}}
  grad = jax.grad(lambda v: bn_statistics_loss([(("BN",), v)], exact).sum())(flat)
  assert not np.any(np.asarray(grad))


# --- SRe2L recovery --------------------------------------------------------------------------

def test_recovery_gradient_equals_the_objective_written_directly():
  apply_fn, variables, images, _ = bn_problem()
  method = SRe2LRecovery(iterations=5)
  ctx = context(ipc=2)
  method.prepare(ctx)
  start = method.start(ctx)
  syn = start.values["images"]
  assert syn.shape == (C * 2, H, H, 1)
  draws = method.draws(3)
  step = method.value_and_grad(start.values, {}, 3)
  stats = variables["batch_stats"]["BatchNorm_0"]

  def direct(syn):
    total = 0.0
    for j in range(2):                       # batch j: image c·ipc + j of every class
      x = syn[jnp.arange(C) * 2 + j]
      x = jnp.roll(x, tuple(int(o) for o in draws["offsets"][j]), axis=(1, 2))
      logits = apply_fn(variables, x, train=False)[0].logits
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(C)).mean()
      total = total + ce + 0.01 * hand_bn_loss(first_conv(variables, x), stats)
    return total

  loss, grad = jax.jit(jax.value_and_grad(direct))(syn)
  assert float(step.loss) == pytest.approx(float(loss), rel=1e-5)
  np.testing.assert_allclose(step.grads["images"], grad, rtol=1e-4, atol=1e-6)
  assert set(step.metrics) == {"ce", "bn"}


def run_loop(method, ctx, iterations):
  """The outer loop's protocol: start, value_and_grad, optax update per value."""
  method.prepare(ctx)
  start = method.start(ctx)
  values = start.values
  states = {k: tx.init(values[k]) for k, tx in start.optimizers.items()}
  losses = []
  for i in range(iterations):
    step = method.value_and_grad(values, start.state, i)
    losses.append(float(step.loss))
    for k, tx in start.optimizers.items():
      updates, states[k] = tx.update(step.grads[k], states[k], values[k])
      values = {**values, k: optax.apply_updates(values[k], updates)}
  return values, losses


def test_recovery_reduces_the_loss_and_stays_in_the_pixel_range():
  ctx = context(ipc=2)
  method = SRe2LRecovery(iterations=30, jitter=1)
  values, losses = run_loop(method, ctx, 30)
  assert losses[-1] < 0.7 * losses[0]
  low, high = pixel_range(ctx.train_images)
  x = np.asarray(values["images"])
  assert x.min() >= low.min() - 1e-6 and x.max() <= high.max() + 1e-6
  out = method.distilled(values)
  assert out.label_kind == "hard" and list(out.labels) == [0, 0, 1, 1, 2, 2]
  assert out.stored_floats == C * 2 * H * H


def test_optimizer_follows_the_cosine_schedule_and_clips():
  tx = recovery_optimizer(0.25, 8)
  x, state = jnp.zeros(3), None
  state = tx.init(x)
  for i in range(8):          # a constant gradient: Adam's step is exactly the lr
    updates, state = tx.update(jnp.ones(3), state, x)
    np.testing.assert_allclose(updates, -0.25 * 0.5 * (1 + np.cos(np.pi * i / 8)), rtol=1e-5)
  tx = recovery_optimizer(0.25, 8, clip=(jnp.array([-0.1]), jnp.array([0.1])))
  x = jnp.array([0.0, 0.05, -0.05])
  updates, _ = tx.update(jnp.array([1.0, -1.0, 1.0]), tx.init(x), x)
  np.testing.assert_allclose(x + updates, [-0.1, 0.1, -0.1], atol=1e-6)


def test_crop_augmentation_draws_and_identity_box():
  rng = np.random.default_rng(0)
  for _ in range(50):
    top, left, h, w = draw_resized_crop(rng, 8, 8)
    assert 0 < h <= 8 and 0 < w <= 8 and top + h <= 8 and left + w <= 8
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8, 8, 1)), jnp.float32)
  same = jax.jit(crop_flip)(x, jnp.array([[0, 0, 8, 8]] * 2, jnp.float32), jnp.array([False, True]))
  np.testing.assert_allclose(same[0], x[0], atol=1e-5)
  np.testing.assert_allclose(same[1], x[1, :, :, ::-1], atol=1e-5)
  method = SRe2LRecovery(iterations=2, augment="crop")
  ctx = context(ipc=1)
  method.prepare(ctx)
  step = method.value_and_grad(method.start(ctx).values, {}, 0)
  assert set(method.draws(0)) == {"boxes", "flips", "offsets"}
  assert np.all(np.isfinite(step.grads["images"]))


def test_draws_and_start_depend_on_seed_and_iteration_only():
  a, b = SRe2LRecovery(), SRe2LRecovery()
  a.prepare(context(seed=3))
  b.prepare(context(seed=3))
  b.draws(9)                                 # another iteration drawn first changes nothing
  assert np.array_equal(a.draws(5)["offsets"], b.draws(5)["offsets"])
  offsets = np.stack([a.draws(i)["offsets"] for i in range(20)])
  assert len({o.tobytes() for o in offsets}) > 1
  start_a, start_b = a.start(a._context), b.start(b._context)
  np.testing.assert_array_equal(start_a.values["images"], start_b.values["images"])
  other = SRe2LRecovery()
  other.prepare(context(seed=4))
  assert not np.array_equal(other.start(other._context).values["images"],
                            start_a.values["images"])


# --- RDED ------------------------------------------------------------------------------------

def test_crop_pad_and_stitch_place_patches():
  images = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
  boxes = np.array([[[1, 2, 4, 4]], [[4, 0, 4, 4]]])
  patches = crop_patches(images, boxes, (4, 4))                # size = box: a plain crop
  np.testing.assert_allclose(patches[0, 0], images[0, 1:5, 2:6], atol=1e-4)
  np.testing.assert_allclose(patches[1, 0], images[1, 4:8, 0:4], atol=1e-4)
  rng = np.random.default_rng(0)                       # shrinking and enlarging crops
  boxes = np.array([[draw_resized_crop(rng, 8, 8, (0.05, 1.0)) for _ in range(3)]
                    for _ in range(2)])
  for size in ((4, 4), (6, 5)):
    got = crop_patches(images, boxes, size)
    for n in range(2):
      for k, (top, left, h, w) in enumerate(boxes[n]):
        want = jax.image.resize(images[n, top:top + h, left:left + w], (*size, 1), "linear",
                                antialias=True)
        np.testing.assert_allclose(got[n, k], want, rtol=1e-5, atol=1e-3)
  padded = pad_center(patches[:, 0], 8, 8)
  np.testing.assert_array_equal(padded[:, 2:6, 2:6], patches[:, 0])
  assert padded[:, :2].sum() == 0 and padded[:, 6:].sum() == 0
  ipc = 2
  cells = np.arange(4 * ipc, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 1))
  out = stitch(cells, 2, ipc, 8, 8)
  for t in range(ipc):
    quadrants = [out[t, :4, :4], out[t, :4, 4:], out[t, 4:, :4], out[t, 4:, 4:]]
    for k, q in enumerate(quadrants):
      np.testing.assert_array_equal(q, k * ipc + t)
  odd = stitch(np.ones((4, 2, 2, 1), np.float32), 2, 1, 5, 5)   # 5 = 3 + 2: cells resized
  assert odd.shape == (1, 5, 5, 1) and np.all(odd == 1)


def toy_teacher():
  """logits = mean(x)·(1, −1, 0): class 0 favours bright patches, class 1 dark ones."""
  w = jnp.array([1.0, -1.0, 0.0])
  return Teacher(lambda v, x, train: (ModelOutput(logits=x.mean((1, 2, 3))[:, None] * w), {}), {})


@pytest.mark.parametrize("factor", [2, 1])
def test_rded_keeps_the_best_scored_patches(factor):
  values = np.random.default_rng(0).permutation(30).astype(np.float32) / 10 + 0.1
  images = values[:, None, None, None] * np.ones((30, H, H, 1), np.float32)  # constant images
  labels = np.arange(30, dtype=np.int32) % C
  ipc = 2
  ctx = context(toy_teacher(), ipc=ipc, images=images, labels=labels)
  method = RDED(factor=factor, num_crop=3)
  method.prepare(ctx)
  start = method.start(ctx)
  assert start.optimizers == {} and method.iterations == 0
  syn = np.asarray(start.values["images"])
  n = ipc * factor ** 2
  assert syn.shape == (C * ipc, H, H, 1)
  for c, brightest_first in ((0, True), (1, False)):
    members = np.flatnonzero(labels == c)
    ranked = members[np.argsort(-values[members] if brightest_first else values[members])][:n]
    np.testing.assert_array_equal(method.selection["source"][c], ranked)
    assert np.all(np.diff(method.selection["scores"][c]) >= 0)
    s = H // factor
    for t in range(ipc):
      for k in range(factor ** 2):
        i, j = divmod(k, factor)
        cell = syn[c * ipc + t, i * s:(i + 1) * s, j * s:(j + 1) * s]
        np.testing.assert_allclose(cell, values[ranked[k * ipc + t]], rtol=1e-5)
  out = method.distilled(start.values)
  assert out.label_kind == "hard" and out.stored_floats == C * ipc * H * H
  with pytest.raises(NotImplementedError):
    method.value_and_grad(start.values, {}, 0)


def test_rded_scores_are_the_teachers_on_the_kept_crops():
  apply_fn, variables, images, labels = bn_problem()
  ctx = context(ipc=1)
  method = RDED(factor=2, num_crop=2)
  method.prepare(ctx)
  for c in range(C):
    src, boxes = method.selection["source"][c], method.selection["boxes"][c]
    patches = crop_patches(images[src], boxes[:, None], (4, 4))[:, 0]
    logits = apply_fn(variables, pad_center(patches, H, H), train=False)[0].logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(len(src), c))
    np.testing.assert_allclose(method.selection["scores"][c], ce, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="candidate"):
    RDED(factor=2, mipc=3).prepare(ctx)


# --- INFER -----------------------------------------------------------------------------------

def test_infer_budget_matches_the_reference():
  assert infer_budget(10, 100, 4) == 9 and infer_budget(50, 100, 4) == 48
  assert infer_budget(26, 100, 4) == 25 and infer_budget(10, 10, 4) == 7
  assert infer_budget(33, 10, 1) == 30   # the reference's int(33 / 1.1) gives 29
  with pytest.raises(ValueError, match="ipc"):
    INFER(compensators_per_base=4).prepare(context(ipc=1))


def test_infer_expanded_set_size_storage_and_gradient():
  apply_fn, variables, real, real_labels = bn_problem()
  ctx = context(ipc=3)
  method = INFER(compensators_per_base=1, iterations=4)
  method.prepare(ctx)
  k, m = method.num_bases, 1
  assert k == 2                                           # ⌊3·3 / (3 + 1)⌋
  start = method.start(ctx)
  u = start.values["compensators"]
  assert u.shape == (k, m, H, H, 1) and not np.any(np.asarray(u))
  base = np.asarray(method._base)                          # [K, C, H, W, 1], real images of class c
  for c in range(C):
    assert all(any(np.array_equal(base[j, c], r) for r in real[real_labels == c]) for j in range(k))

  # Gradient: the per-(k, m) SRe2L objective written directly.
  u = jnp.asarray(np.random.default_rng(2).normal(0, 0.1, u.shape), jnp.float32)
  draws = method.draws(1)
  step = method.value_and_grad({"compensators": u}, {}, 1)
  stats = variables["batch_stats"]["BatchNorm_0"]

  def direct(u):
    total = 0.0
    for g in range(k * m):
      x = jnp.roll(base[g // m] + u[g // m, g % m], tuple(int(o) for o in draws["offsets"][g]),
                   axis=(1, 2))
      logits = apply_fn(variables, x, train=False)[0].logits
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(C)).mean()
      total = total + ce + 1.0 * hand_bn_loss(first_conv(variables, x), stats)
    return total

  loss, grad = jax.jit(jax.value_and_grad(direct))(u)
  assert float(step.loss) == pytest.approx(float(loss), rel=1e-5)
  np.testing.assert_allclose(step.grads["compensators"], grad, rtol=1e-4, atol=1e-6)

  # The expanded set: K·(M+1) images per class; stored = base images + compensators (+ labels).
  out = method.distilled({"compensators": u})
  per_class = k * (m + 1)
  assert out.images.shape == (C * per_class, H, H, 1) and out.label_kind == "probs"
  assert out.labels.shape == (C * per_class, C)
  np.testing.assert_allclose(out.labels.sum(1), 1.0, rtol=1e-5)
  low, high = pixel_range(real)
  for c in range(C):
    mine = out.images[c * per_class:(c + 1) * per_class]
    np.testing.assert_array_equal(mine[:k], base[:, c])
    np.testing.assert_allclose(mine[k:], np.clip(base[:, c] + u[:, 0], low, high), atol=1e-6)
  images_floats = (k * C + k * m) * H * H
  assert images_floats <= ctx.ipc * C * H * H
  assert out.stored_floats == images_floats + out.labels.size
  hard = INFER(compensators_per_base=1, labels="hard")
  hard.prepare(ctx)
  hard_out = hard.distilled(hard.start(ctx).values)
  assert hard_out.stored_floats == images_floats and hard_out.label_kind == "hard"
  assert list(hard_out.labels) == list(np.repeat(np.arange(C), per_class))


def test_infer_reduces_the_loss_and_draws_depend_on_seed_and_iteration():
  method = INFER(compensators_per_base=1, iterations=20)
  _, losses = run_loop(method, context(ipc=3), 20)
  assert losses[-1] < losses[0]
  again = INFER(compensators_per_base=1)
  again.prepare(context(ipc=3))
  assert np.array_equal(method.draws(7)["offsets"], again.draws(7)["offsets"])
  np.testing.assert_array_equal(method._base, again._base)
