"""DC/DSA gradient matching and DM distribution matching against direct formulas; Siamese DSA."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.data.dsa import diff_augment, same_transform
from kd_jax.dataset_distill.distribution_matching import (DistributionMatching,
                                                          class_embedding_loss)
from kd_jax.dataset_distill.gradient_matching import (GradientMatching, class_matching_loss,
                                                      get_loops, match_loss,
                                                      sample_class_batches)
from kd_jax.dataset_distill.method import Context, iteration_key
from kd_jax.models import create_model, init_model, make_apply_fn
from kd_jax.step import cross_entropy

COUNTS = (7, 5, 4)  # unequal classes: real batches get padded
IPC = 2


def toy_augment(images, key):
  """Per-image random gain and flip: a stand-in for DSA that compiles fast (the real DSA is
  tested with `same_transform` below)."""
  gain_key, flip_key = jax.random.split(key)
  n = images.shape[0]
  gain = 0.5 + jax.random.uniform(gain_key, (n, 1, 1, 1))
  flip = jax.random.uniform(flip_key, (n, 1, 1, 1)) < 0.5
  return jnp.where(flip, images[:, :, ::-1], images) * gain


@functools.lru_cache(maxsize=None)
def _net():
  module = create_model("convnet", num_classes=3, depth=1, width=4)
  return make_apply_fn(module), lambda key: init_model(module, key, (1, 8, 8, 1))[0]


def _context(augment=None, seed=0):
  apply_fn, init_params = _net()
  rng = np.random.default_rng(1)
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(COUNTS)])
  labels = rng.permutation(labels)
  images = rng.standard_normal((labels.size, 8, 8, 1)).astype(np.float32)
  return Context(train_images=images, train_labels=labels, num_classes=3, ipc=IPC,
                 apply_fn=apply_fn, init_params=init_params, augment=augment, teacher=None,
                 seed=seed, workdir=Path("unused"))


def _np_distance_wb(gwr, gws):
  """The reference `distance_wb` on PyTorch-layout numpy arrays."""
  shape = gwr.shape
  if len(shape) == 1:
    return 0.0
  gwr, gws = gwr.reshape(shape[0], -1), gws.reshape(shape[0], -1)
  return np.sum(1 - np.sum(gwr * gws, -1) / (np.linalg.norm(gwr, axis=-1)
                                              * np.linalg.norm(gws, axis=-1) + 1e-6))


def _to_torch_layout(g):
  g = np.asarray(g, np.float64)
  if g.ndim == 4:  # HWIO -> OIHW
    return g.transpose(3, 2, 0, 1)
  if g.ndim == 2:  # [in, out] -> [out, in]
    return g.T
  return g


def test_match_loss_equals_reference_distance_wb():
  k = jax.random.split(jax.random.key(0), 6)
  tree = lambda a, b, c: {"conv": {"kernel": jax.random.normal(a, (3, 3, 2, 5)),
                                   "bias": jax.random.normal(b, (5,))},
                          "dense": {"kernel": jax.random.normal(c, (12, 4))}}
  real, noise = tree(*k[:3]), tree(*k[3:])
  syn = jax.tree.map(lambda r, n: r + 0.7 * n, real, noise)  # correlated: cosines far from 0
  expected = sum(_np_distance_wb(_to_torch_layout(r), _to_torch_layout(s))
                 for r, s in zip(jax.tree.leaves(real), jax.tree.leaves(syn)))
  np.testing.assert_allclose(match_loss(syn, real), expected, rtol=1e-5)
  # A layout mistake (rows over the input axis) changes the value.
  wrong = sum(_np_distance_wb(np.asarray(r) if r.ndim == 2 else _to_torch_layout(r),
                              np.asarray(s) if s.ndim == 2 else _to_torch_layout(s))
              for r, s in zip(jax.tree.leaves(real), jax.tree.leaves(syn)))
  assert abs(wrong - expected) > 1e-3
  # Biases count 0; identical gradients give 0.
  np.testing.assert_allclose(match_loss(real, real), 0.0, atol=1e-4)


def test_same_transform_is_one_transform_for_any_batch():
  aug = functools.partial(diff_augment, strategy="color_crop_flip_rotate", mode="all")
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
  key = jax.random.key(5)
  siamese = jax.jit(lambda x: same_transform(aug, x, key))
  small = siamese(images[:1])
  large = siamese(jnp.concatenate([images, images[:1], images]))
  np.testing.assert_allclose(large[0], small[0], atol=1e-6)
  np.testing.assert_allclose(large[3], small[0], atol=1e-6)
  np.testing.assert_allclose(large[4], large[0], atol=1e-6)
  np.testing.assert_allclose(large[1], siamese(images[1:2])[0], atol=1e-6)
  assert not np.allclose(large[0], images[0], atol=1e-3)  # it did transform
  # A per-image augmentation applied directly transforms copies of one image differently.
  per_image = toy_augment(jnp.stack([images[0]] * 4), key)
  assert not np.allclose(per_image[0], per_image[1], atol=1e-3)
  siamese_toy = same_transform(toy_augment, jnp.stack([images[0]] * 4), key)
  np.testing.assert_allclose(siamese_toy[1:], jnp.broadcast_to(siamese_toy[0], (3, 8, 8, 2)))


@pytest.mark.parametrize("augment", [None, toy_augment])
def test_dc_class_loss_is_zero_for_the_real_batch(augment):
  apply_fn, init_params = _net()
  params = init_params(jax.random.key(1))
  real = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  mask = jnp.ones(4)
  loss_fn = jax.jit(functools.partial(class_matching_loss, label=1, key=jax.random.key(3),
                                      apply_fn=apply_fn, augment=augment))
  assert abs(float(loss_fn(real, params, real, mask))) < 1e-3
  # Padding is ignored: two real images plus two masked junk rows match the two images.
  padded = jnp.concatenate([real[:2], 100 * real[2:]])
  loss = loss_fn(real[:2], params, padded, jnp.array([1.0, 1, 0, 0]))
  assert abs(float(loss)) < 1e-3
  other = loss_fn(real[:2], params, real, mask)
  assert float(other) > 1e-2


def test_dm_class_loss_equals_numpy():
  apply_fn, init_params = _net()
  params = init_params(jax.random.key(1))
  k = jax.random.split(jax.random.key(2), 2)
  real, syn = jax.random.normal(k[0], (5, 8, 8, 1)), jax.random.normal(k[1], (2, 8, 8, 1))
  mask = jnp.array([1.0, 1, 1, 0, 0])
  features = jax.jit(lambda x: apply_fn({"params": params}, x, train=True)[0].features)
  emb = lambda x: np.asarray(features(x)["pre_logits"], np.float64)
  expected = np.sum((emb(real[:3]).mean(0) - emb(syn).mean(0)) ** 2)
  loss_fn = lambda augment: jax.jit(functools.partial(class_embedding_loss, apply_fn=apply_fn,
                                                       augment=augment))
  got = loss_fn(None)(syn, params, real, mask, jax.random.key(0))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # With DSA both batches get one transform: the loss equals numpy on the transformed batches.
  key = jax.random.key(9)
  t = jax.jit(lambda x: same_transform(toy_augment, x, key))
  expected = np.sum((emb(t(real[:3])).mean(0) - emb(t(syn)).mean(0)) ** 2)
  got = loss_fn(toy_augment)(syn, params, real, mask, key)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sample_class_batches_pads_and_masks():
  per_class = [np.arange(0, 7), np.arange(7, 12), np.arange(12, 16)]
  indices, mask = sample_class_batches(np.random.default_rng(0), per_class, 6)
  assert indices.shape == mask.shape == (3, 6)
  np.testing.assert_array_equal(mask.sum(1), [6, 5, 4])
  for c, idx in enumerate(per_class):
    chosen = indices[c][mask[c] > 0]
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(idx)
    assert set(indices[c]) <= set(idx)


def _class_real(context, c):
  return jnp.asarray(context.train_images[context.train_labels == c])


def test_dc_image_gradient_equals_direct_objective():
  """At a fresh iteration with every real image of a class in its batch (batch_real ≥ class
  size) and no DSA, the objective is a plain function of X; its jax.grad is the step's."""
  context = _context()
  method = GradientMatching(batch_real=64, outer_loop=2, inner_loop=1)
  method.prepare(context)
  values = method.start(context).values
  step = method.value_and_grad(values, method.start(context).state, 4)
  params = context.init_params(jax.random.split(iteration_key(context.seed, 4), 3)[0])

  def ce(p, x, c):
    logits = context.apply_fn({"params": p}, x, train=True)[0].logits
    return jnp.mean(cross_entropy(logits, jnp.full(x.shape[0], c)))

  def distance(gr, gs):  # PyTorch layout, written out
    if gr.ndim == 1:
      return 0.0
    gr = jnp.moveaxis(gr, -1, 0).reshape(gr.shape[-1], -1)
    gs = jnp.moveaxis(gs, -1, 0).reshape(gs.shape[-1], -1)
    return jnp.sum(1 - jnp.sum(gr * gs, -1) / (jnp.linalg.norm(gr, axis=-1)
                                               * jnp.linalg.norm(gs, axis=-1) + 1e-6))

  def objective(images):
    total = 0.0
    for c in range(3):
      g_real = jax.grad(ce)(params, _class_real(context, c), c)
      g_syn = jax.grad(ce)(params, images[c * IPC:(c + 1) * IPC], c)
      total += sum(distance(r, s) for r, s in zip(jax.tree.leaves(g_real),
                                                  jax.tree.leaves(g_syn)))
    return total

  loss, grad = jax.jit(jax.value_and_grad(objective))(values["images"])
  np.testing.assert_allclose(step.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(step.grads["images"], grad, rtol=1e-3, atol=1e-6)
  assert np.abs(grad).max() > 1e-4


def test_dm_image_gradient_equals_direct_objective():
  context = _context()
  method = DistributionMatching(batch_real=64)
  method.prepare(context)
  values = method.start(context).values
  step = method.value_and_grad(values, {}, 3)
  params = context.init_params(jax.random.split(iteration_key(context.seed, 3))[0])
  emb = lambda x: context.apply_fn({"params": params}, x, train=True)[0].features["pre_logits"]

  def objective(images):
    return sum(jnp.sum((emb(_class_real(context, c)).mean(0)
                        - emb(images[c * IPC:(c + 1) * IPC]).mean(0)) ** 2) for c in range(3))

  loss, grad = jax.jit(jax.value_and_grad(objective))(values["images"])
  np.testing.assert_allclose(step.loss, loss, rtol=1e-5)
  np.testing.assert_allclose(step.grads["images"], grad, rtol=1e-4, atol=1e-7)


def test_dc_network_is_fresh_then_trained():
  context = _context()
  method = GradientMatching(batch_real=8, outer_loop=2, inner_loop=1, momentum_net=0.0)
  method.prepare(context)
  start = method.start(context)
  assert method.iterations == 1000 * 2
  values = start.values
  first = method.value_and_grad(values, start.state, 0)
  fresh = context.init_params(jax.random.split(iteration_key(context.seed, 0), 3)[0])
  jax.tree.map(np.testing.assert_array_equal, first.state["params"], fresh)
  # Iteration 1 trains the carried network one epoch (one batch: batch_train ≥ 6 images, no
  # DSA) of plain SGD on the current synthetic set before matching.
  values = {"images": values["images"] - 0.1 * first.grads["images"]}
  second = method.value_and_grad(values, first.state, 1)
  labels = jnp.repeat(jnp.arange(3), IPC)
  ce = lambda p: jnp.mean(cross_entropy(
      context.apply_fn({"params": p}, values["images"], train=True)[0].logits, labels))
  expected = jax.tree.map(lambda p, g: p - 0.01 * g, fresh, jax.jit(jax.grad(ce))(fresh))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               second.state["params"], expected)
  assert "net_loss" in second.metrics and "net_loss" not in first.metrics
  # Iteration 2 starts a fresh network again, whatever the state holds.
  third = method.value_and_grad(values, second.state, 2)
  fresh2 = context.init_params(jax.random.split(iteration_key(context.seed, 2), 3)[0])
  jax.tree.map(np.testing.assert_array_equal, third.state["params"], fresh2)
  assert jax.tree.structure(third.state) == jax.tree.structure(start.state)


@pytest.mark.parametrize("method", [
    GradientMatching(batch_real=3, outer_loop=2, inner_loop=2, momentum_net=0.5),
    DistributionMatching(batch_real=3)], ids=["dc", "dm"])
def test_draws_depend_on_seed_and_iteration_only(method):
  context = _context(augment=toy_augment)
  method.prepare(context)
  start = method.start(context)
  state = method.value_and_grad(start.values, start.state, 0).state
  a = method.value_and_grad(start.values, state, 1)
  method.value_and_grad(start.values, state, 5)  # something else in between
  b = method.value_and_grad(start.values, state, 1)
  np.testing.assert_array_equal(a.loss, b.loss)
  np.testing.assert_array_equal(a.grads["images"], b.grads["images"])
  jax.tree.map(np.testing.assert_array_equal, a.state, b.state)
  c = method.value_and_grad(start.values, state, 2)
  assert not np.allclose(a.grads["images"], c.grads["images"])


def test_dm_protocol_iterations_reduce_the_loss():
  context = _context(augment=toy_augment)
  method = DistributionMatching(batch_real=64, lr_img=0.3, init="noise")
  method.prepare(context)
  start = method.start(context)
  values, tx = start.values, start.optimizers["images"]
  opt_state = tx.init(values["images"])
  before = float(method.value_and_grad(values, {}, 0).loss)
  for i in range(10):
    step = method.value_and_grad(values, {}, i)
    updates, opt_state = tx.update(step.grads["images"], opt_state, values["images"])
    values = {"images": optax.apply_updates(values["images"], updates)}
  after = float(method.value_and_grad(values, {}, 0).loss)
  assert after < 0.5 * before, (before, after)
  out = method.distilled(values)
  assert out.label_kind == "hard" and out.lr is None and out.images.shape == (3 * IPC, 8, 8, 1)
  np.testing.assert_array_equal(out.labels, [0, 0, 1, 1, 2, 2])
  assert out.stored_floats == 3 * IPC * 64


def test_defaults_and_loops():
  dc, dm = GradientMatching(), DistributionMatching()
  assert (dc.lr_img, dc.momentum_img, dc.lr_net, dc.batch_real, dc.batch_train) == (
      0.1, 0.5, 0.01, 256, 256)
  assert (dm.iterations, dm.lr_img, dm.momentum_img, dm.batch_real) == (20000, 1.0, 0.5, 256)
  assert get_loops(10) == (10, 50) and get_loops(1) == (1, 1)
  with pytest.raises(ValueError, match="ipc"):
    GradientMatching().prepare(_context())  # ipc=2 has no reference loops
  with pytest.raises(ValueError, match="init"):
    DistributionMatching(init="real_correct").prepare(_context())
