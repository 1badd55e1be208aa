"""Dataset distillation on a mesh: experts and trajectory matching equal one device; several
segments per iteration equal the mean of single segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dd_tiny_model import tiny_model, tiny_problem
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill.experts import train_expert
from kd_jax.dataset_distill.matching import TrajectoryMatcher, make_inner_step, minibatch_plan
from kd_jax.sharding import make_mesh

NUM_STEPS, NUM_IMAGES, BATCH_SYN, SEGMENTS = 2, 16, 8, 2
GRAD_NAMES = ("images", "labels", "lr")


def _flip(x, key):
  return diff_augment(x, key, strategy="flip")


def _problem():
  """Shared (images, label logits, lr) and two segments' (θ_start, θ_target, indices, keys)."""
  apply_fn, params = tiny_model(jax.random.key(0))
  theta0, unravel = ravel_pytree(params)
  k = jax.random.split(jax.random.key(1), 6)
  images = jax.random.normal(k[0], (NUM_IMAGES, 8, 8, 1))
  label_logits = jax.random.normal(k[1], (NUM_IMAGES, 3))
  starts = jnp.stack([theta0, theta0 + 0.02 * jax.random.normal(k[2], theta0.shape)])
  targets = starts + 0.05 * jax.random.normal(k[3], starts.shape)
  rng = np.random.default_rng(0)
  indices = np.stack([minibatch_plan(rng, NUM_IMAGES, BATCH_SYN, NUM_STEPS)
                      for _ in range(SEGMENTS)])
  keys = jax.random.split(k[4], SEGMENTS * NUM_STEPS).reshape(SEGMENTS, NUM_STEPS)
  segments = (starts, targets, indices, keys)
  return (apply_fn, unravel), (images, label_logits, jnp.asarray(0.3)), segments


def _matcher(model, mode="exact", mesh=None, segments=1):
  step = make_inner_step(*model, label_kind="logits", augment=_flip)
  return TrajectoryMatcher(step, mode=mode, learn_labels=True, segments=segments, mesh=mesh)


def _call(matcher, shared, segments):
  starts, targets, indices, keys = segments
  images, labels, lr = shared
  return matcher(starts, targets, images, labels, lr, indices, keys)


def _assert_same(got, want, rtol=1e-5):
  np.testing.assert_allclose(got[0], want[0], rtol=rtol)
  for name in GRAD_NAMES:
    np.testing.assert_allclose(getattr(got[1], name), getattr(want[1], name), rtol=rtol,
                               atol=rtol * float(jnp.abs(getattr(want[1], name)).max()),
                               err_msg=name)


def test_segments_average_the_single_segment_losses_and_gradients():
  model, shared, segments = _problem()
  single = _matcher(model)
  per_segment = [_call(single, shared, tuple(x[g] for x in segments)) for g in range(SEGMENTS)]
  mean = (np.mean([l for l, _ in per_segment]),
          jax.tree.map(lambda *g: sum(g) / SEGMENTS, *[grads for _, grads in per_segment]))
  for mode in ("exact", "unrolled"):
    _assert_same(_call(_matcher(model, mode, segments=SEGMENTS), shared, segments), mean)


@pytest.mark.parametrize("axes,segments,mode", [
    ((("data", 8),), 1, "exact"),
    ((("segment", 2), ("data", 4)), SEGMENTS, "exact"),
    ((("segment", 2), ("data", 4)), SEGMENTS, "unrolled")])
def test_sharded_matching_equals_one_device(axes, segments, mode):
  model, shared, all_segments = _problem()
  segs = all_segments if segments > 1 else tuple(x[0] for x in all_segments)
  mesh = make_mesh(axes)
  sharded = _matcher(model, mode, mesh=mesh, segments=segments)
  _assert_same(_call(sharded, shared, segs),
               _call(_matcher(model, "exact", segments=segments), shared, segs))
  # The inner step really is split: each device convolves its share of one segment's minibatch.
  starts, _, indices, keys = segs
  images, labels, lr = shared
  step_hlo = sharded.step.lower(sharded._place(starts), images, labels, lr,
                                sharded._batch(indices, 0), keys[..., 0]).compile().as_text()
  per_device = BATCH_SYN // mesh.shape["data"]
  convs = [line for line in step_hlo.splitlines() if " convolution(" in line]
  assert convs and all(f"f32[{per_device},8,8,4]" in line for line in convs[:1]), convs[:1]
  assert "all-reduce" in step_hlo


def test_bad_mesh_for_batch_or_segments_raises():
  model, shared, segments = _problem()
  with pytest.raises(ValueError, match="distill.segments=3 must be a multiple"):
    _matcher(model, mesh=make_mesh((("segment", 2), ("data", 4))), segments=3)
  single = tuple(x[0] for x in segments)
  starts, targets, indices, keys = single
  with pytest.raises(ValueError, match="distill.batch_syn=6 must be divisible by the 8"):
    _call(_matcher(model, mesh=make_mesh((("data", 8),))), shared,
          (starts, targets, indices[:, :6], keys))
  with pytest.raises(ValueError, match="with segments=2, theta must be"):
    _call(_matcher(model, segments=SEGMENTS), shared, single)


@pytest.mark.parametrize("axes", [(("data", 8),), (("segment", 2), ("data", 4))])
def test_sharded_expert_equals_one_device(axes):
  apply_fn, init_params, images, labels = tiny_problem(20)
  kwargs = dict(epochs=2, lr=0.1, batch_size=8, seed=0, augment=_flip)  # last batch padded
  one = train_expert(apply_fn, init_params, images, labels, **kwargs)
  sharded = train_expert(apply_fn, init_params, images, labels, mesh=make_mesh(axes), **kwargs)
  assert np.abs(one[-1] - one[0]).max() > 1e-3  # it trained
  np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="experts.batch_size=6 must be divisible by the 8"):
    train_expert(apply_fn, init_params, images, labels, mesh=make_mesh(axes),
                 **{**kwargs, "batch_size": 6})
