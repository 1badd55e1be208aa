"""Label-free (DINO-style) self-distillation: the cross-view loss and its identities, the center
update, no gradient into the teacher and its EMA step, the momentum schedule, bad input, the
linear probe, and kill-and-resume through `trainer.train`."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import trainer
from kd_jax.regimes import label_free
from kd_jax.regimes.label_free import LabelFree
from kd_jax.step import TrainState, make_train_step, per_part_optimizer

HEAD = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "num_layers": 2}


def _mlp(model):
  return model("mlp", seed=1, hidden_sizes=(32,))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_view_loss_is_the_entropy_for_equal_outputs_and_pairs_distinct_views():
  rng = np.random.default_rng(0)
  loss = jax.jit(label_free.cross_view_loss, static_argnames=("student_temperature",
                                                              "teacher_temperature"))
  x = rng.normal(size=(5, 8)).astype(np.float32)
  log_p = _log_softmax(x / 0.5)
  np.testing.assert_allclose(loss(np.stack([x, x]), np.stack([x, x]), np.zeros(8, np.float32),
                                  student_temperature=0.5, teacher_temperature=0.5),
                             -np.sum(np.exp(log_p) * log_p, -1), rtol=1e-5)
  s, t = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  center = rng.normal(size=8).astype(np.float32)
  h = lambda i, j: -np.sum(np.exp(_log_softmax((t[i] - center) / 0.04)) *
                           _log_softmax(s[j] / 0.1), -1)
  kwargs = {"student_temperature": 0.1, "teacher_temperature": 0.04}
  np.testing.assert_allclose(loss(s, t, center, **kwargs),
                             sum(h(i, j) for i in range(3) for j in range(3) if i != j) / 6,
                             rtol=1e-5)
  grad_s, grad_t = jax.jit(jax.grad(lambda s, t: loss(s, t, center, **kwargs).sum(),
                                    argnums=(0, 1)))(s, t)
  assert np.all(grad_t == 0) and np.all(np.abs(grad_s) > 0)


def test_the_center_update_formula_averages_views_and_real_rows():
  t = jax.random.normal(jax.random.key(0), (2, 4, 3))
  center, mask = jnp.array([1.0, -1.0, 0.5]), jnp.array([1.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(label_free.update_center(center, t, mask, 0.9),
                             0.9 * center + 0.1 * t[:, mask > 0].mean((0, 1)), rtol=1e-6)


def test_the_teacher_gets_no_gradient_is_the_ema_of_the_student_and_moves_the_center(
    model, batches):
  apply, variables = _mlp(model)
  method = LabelFree(apply, momentum=0.9, center_momentum=0.8, **HEAD)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": variables}, batches[0])
  grad = jax.jit(jax.grad(lambda f: method.loss(trainable, f, extra, batches[0], 0,
                                                jax.random.key(0))[0]))(frozen)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grad))
  # The teacher's head outputs on the views the first step draws (the step folds in step 0).
  views_key = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))[0]
  teacher_out = jax.jit(lambda x: jax.vmap(lambda v: method.head.apply(
      frozen["teacher"]["head"], apply(frozen["teacher"]["student"], v, train=False)[0].features[
          "pre_logits"]))(method.views(x, views_key)))(batches[0]["image"])
  tx = per_part_optimizer(trainable, optax.sgd(0.1))
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  step = jax.jit(chex.assert_max_traces(make_train_step(method, tx), n=1), donate_argnums=0)
  for k, batch in enumerate(batches):
    teacher = jax.device_get(state.frozen["teacher"])
    state, metrics = step(state, batch, jax.random.key(0))
    student = {"student": trainer.student_variables(state),
               "head": {"params": state.trainable["head"]}}
    chex.assert_trees_all_close(state.frozen["teacher"], jax.tree.map(
        lambda t, s: 0.9 * t + 0.1 * s, teacher, jax.device_get(student)), rtol=1e-6, atol=1e-7)
    if k == 0:
      np.testing.assert_allclose(state.extra["label_free"]["center"],
                                 0.2 * teacher_out.mean((0, 1)), rtol=1e-4, atol=1e-7)
  assert {"terms/label_free", "train/teacher_entropy", "train/loss"} <= set(metrics)
  assert 0 < metrics["train/teacher_entropy"] <= np.log(HEAD["out_dim"]) + 1e-5
  assert label_free.teacher_backbone(state) is state.frozen["teacher"]["student"]


def test_teacher_momentum_is_constant_or_dinos_cosine_to_one():
  assert float(label_free.teacher_momentum(500, 0.996, None)) == np.float32(0.996)
  np.testing.assert_allclose(label_free.teacher_momentum(np.array([0, 50, 100, 200]), 0.9, 100),
                             [0.9, 0.95, 1.0, 1.0], rtol=1e-6)


def test_bad_input_is_named(model, batches):
  apply, variables = _mlp(model)
  with pytest.raises(ValueError, match=r"no tap 'stage9'; it has \['pre_logits', 'stage1'\]"):
    LabelFree(apply, tap="stage9", **HEAD).init(jax.random.key(0), {"student": variables},
                                                batches[0])
  with pytest.raises(ValueError, match=r"no variables for 'student'"):
    LabelFree(apply, **HEAD).init(jax.random.key(0), {"backbone": variables}, batches[0])
  for kwargs, message in [({"teacher_temperature": 0.0}, r"teacher_temperature must be > 0"),
                          ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
                          ({"num_views": 1}, r"num_views must be an integer >= 2"),
                          ({"momentum_steps": 0}, r"momentum_steps must be an integer >= 1"),
                          ({"strategy": "blur"}, r"unknown families \['blur'\]")]:
    with pytest.raises(ValueError, match=message):
      LabelFree(apply, **{**HEAD, **kwargs})


def test_linear_probe_fits_a_linearly_separable_problem_exactly():
  rng = np.random.default_rng(0)
  centers = 4.0 * rng.normal(size=(3, 6))
  labels = rng.integers(0, 3, 240)
  images = (centers[labels] + 0.3 * rng.normal(size=(240, 6))).reshape(240, 1, 1, 6)
  features = lambda x: x.reshape(x.shape[0], -1)
  train, test = (images[:180], labels[:180]), (images[180:], labels[180:])
  assert label_free.linear_probe(features, train, test, batch_size=64) == 1.0
  assert label_free.linear_probe(features, (images[:180], rng.permutation(labels[:180])),
                                 test) < 0.7  # shuffled labels: no linear rule to find
  with pytest.raises(ValueError, match="l2 must be > 0"):
    label_free.linear_probe(features, train, test, l2=0.0)


def test_kill_and_resume_through_the_trainer_is_identical_and_keeps_teacher_and_center(
    model, resumed_equals_uninterrupted):
  make_stage = lambda steps: label_free.stage("label_free", _mlp(model),
                                              tx=optax.sgd(0.05, momentum=0.9), num_steps=steps,
                                              momentum=0.9, momentum_steps=10,
                                              strategy="color", **HEAD)
  state = resumed_equals_uninterrupted(make_stage)
  assert set(state.frozen["teacher"]) == {"student", "head"}
  assert np.any(state.extra["label_free"]["center"] != 0)
  assert float(optax.global_norm(jax.tree.map(
      lambda a, b: a - b, label_free.teacher_backbone(state),
      trainer.student_variables(state)))) > 0
