"""The pure KD step: objective algebra, frozen teacher, masks, eval sums."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses
from kd_jax.models import ModelOutput, init_model, make_apply_fn
from kd_jax.train_step import (TrainState, cross_entropy, make_eval_step, make_kd_objective,
                               make_loss_and_grads, make_train_step)


class TinyNet(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = x.reshape(x.shape[0], -1)
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(h))
    h = nn.relu(h)
    return ModelOutput(logits=nn.Dense(self.num_classes)(h), features={"pre_logits": h})


def _setup(seed=0):
  module = TinyNet()
  apply_fn = make_apply_fn(module)
  s_params, s_state = init_model(module, jax.random.PRNGKey(seed), (4, 2, 2, 1))
  t_params, t_state = init_model(module, jax.random.PRNGKey(seed + 1), (4, 2, 2, 1))
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.normal(size=(6, 2, 2, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
           "mask": jnp.ones(6, jnp.float32)}
  return apply_fn, {"params": s_params, **s_state}, {"params": t_params, **t_state}, batch


def test_objective_is_convex_combination_of_ce_and_kd():
  rng = np.random.default_rng(0)
  s = ModelOutput(jnp.asarray(rng.normal(size=(5, 4)), jnp.float32))
  t = ModelOutput(jnp.asarray(rng.normal(size=(5, 4)), jnp.float32))
  batch = {"label": jnp.asarray([0, 1, 2, 3, 0])}
  loss, metrics = make_kd_objective("kd", alpha=0.3, loss_hparams={"temperature": 2.0})(s, t, batch, {})
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s.logits, batch["label"]))
  kd = jnp.mean(losses.kd(s.logits, t.logits, temperature=2.0))
  np.testing.assert_allclose(loss, 0.7 * ce + 0.3 * kd, rtol=1e-6)
  np.testing.assert_allclose(metrics["distill/kd"], kd, rtol=1e-6)


def test_baseline_objective_is_cross_entropy_and_mask_drops_padding():
  rng = np.random.default_rng(1)
  s = ModelOutput(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32))
  labels = jnp.asarray([0, 1, 2, 1])
  loss, _ = make_kd_objective(None)(s, None, {"label": labels, "mask": jnp.array([1., 1., 0., 0.])}, {})
  np.testing.assert_allclose(loss, jnp.mean(cross_entropy(s.logits[:2], labels[:2])), rtol=1e-6)


def test_soft_label_cross_entropy_matches_hard_labels_for_one_hot():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
  labels = jnp.asarray([4, 0, 1, 3])
  np.testing.assert_allclose(cross_entropy(logits, jax.nn.one_hot(labels, 5)),
                             cross_entropy(logits, labels), rtol=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha_raises(alpha):
  with pytest.raises(ValueError, match="alpha"):
    make_kd_objective("kd", alpha=alpha)


def test_unknown_loss_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: .*kd"):
    make_kd_objective("no_such_loss")


def test_teacher_gets_no_gradient_and_student_does():
  apply_fn, s_vars, t_vars, batch = _setup()
  objective = make_kd_objective("kd", alpha=1.0, loss_hparams={"temperature": 4.0})
  loss_and_grads = make_loss_and_grads(apply_fn, apply_fn, objective)
  s_state = {k: v for k, v in s_vars.items() if k != "params"}

  def loss_wrt_teacher(t_params):
    (loss, _), _ = loss_and_grads(s_vars["params"], s_state, {}, {**t_vars, "params": t_params},
                                  batch, jax.random.PRNGKey(0))
    return loss

  t_grads = jax.grad(loss_wrt_teacher)(t_vars["params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(t_grads))
  (_, _), grads = loss_and_grads(s_vars["params"], s_state, {}, t_vars, batch, jax.random.PRNGKey(0))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["student"])) > 0


def test_train_step_matches_manual_sgd_and_updates_batch_stats():
  apply_fn, s_vars, t_vars, batch = _setup()
  tx = optax.sgd(0.1)
  objective = make_kd_objective("kd", alpha=0.5, loss_hparams={"temperature": 4.0})
  s_state = {k: v for k, v in s_vars.items() if k != "params"}
  state = TrainState.create(s_vars["params"], s_state, tx)
  step = jax.jit(make_train_step(apply_fn, apply_fn, objective, tx))
  new_state, metrics = step(state, t_vars, batch, jax.random.PRNGKey(0))
  (_, (_, new_model_state)), grads = make_loss_and_grads(apply_fn, apply_fn, objective)(
      s_vars["params"], s_state, {}, t_vars, batch, jax.random.fold_in(jax.random.PRNGKey(0), 0))
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, s_vars["params"], grads["student"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.params, expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new_state.model_state, new_model_state)
  assert int(new_state.step) == 1
  assert not np.allclose(new_state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                         s_state["batch_stats"]["BatchNorm_0"]["mean"])
  assert set(metrics) >= {"train/loss", "train/accuracy", "task/ce", "distill/kd", "grads/l2"}


def test_eval_step_sums_only_real_examples():
  apply_fn, s_vars, _, batch = _setup()
  eval_step = jax.jit(make_eval_step(apply_fn))
  full = eval_step(s_vars, batch)
  padded = {"image": jnp.concatenate([batch["image"], jnp.zeros_like(batch["image"][:2])]),
            "label": jnp.concatenate([batch["label"], jnp.zeros(2, jnp.int32)]),
            "mask": jnp.concatenate([batch["mask"], jnp.zeros(2)])}
  padded_sums = eval_step(s_vars, padded)
  for key in full:
    np.testing.assert_allclose(full[key], padded_sums[key], rtol=1e-6)
  assert float(full["eval/count"]) == 6
