"""The general step with a KD method: frozen teacher, masks, manual SGD, eval sums."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.distiller import Distiller, Term
from kd_jax.models import ModelOutput, init_model, make_apply_fn
from kd_jax.step import TrainState, cross_entropy, make_eval_step, make_train_step


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


def _distiller(apply_fn, terms):
  return Distiller(apply_fn, terms, {"teacher": apply_fn})


def test_mask_drops_padding_from_every_term():
  apply_fn, s_vars, t_vars, batch = _setup()
  # BatchNorm in train mode would see the padded rows: run the student in eval mode.
  eval_apply = lambda v, x, *, train, rngs=None: apply_fn(v, x, train=False)
  method = Distiller(eval_apply, [Term("ce"), Term("kd"), Term("sp", student="pre_logits",
                                                               teacher="pre_logits")],
                     {"teacher": apply_fn})
  trainable, frozen, extra = method.init(jax.random.PRNGKey(0), {"student": s_vars,
                                                                 "teacher": t_vars}, batch)
  padded = {"image": jnp.concatenate([batch["image"], 9.0 * jnp.ones_like(batch["image"][:2])]),
            "label": jnp.concatenate([batch["label"], jnp.zeros(2, jnp.int32)]),
            "mask": jnp.concatenate([batch["mask"], jnp.zeros(2)])}
  loss, (metrics, _) = method.loss(trainable, frozen, extra, batch, 0, jax.random.PRNGKey(0))
  padded_loss, (padded_metrics, _) = method.loss(trainable, frozen, extra, padded, 0,
                                                 jax.random.PRNGKey(0))
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-5)
  for name in ("terms/ce", "terms/kd", "terms/sp"):
    np.testing.assert_allclose(padded_metrics[name], metrics[name], rtol=1e-5)


def test_soft_label_cross_entropy_matches_hard_labels_for_one_hot():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
  labels = jnp.asarray([4, 0, 1, 3])
  np.testing.assert_allclose(cross_entropy(logits, jax.nn.one_hot(labels, 5)),
                             cross_entropy(logits, labels), rtol=1e-6)


def test_unknown_loss_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: .*kd"):
    Distiller(None, [Term("no_such_loss")], {"teacher": None})


def test_teacher_gets_no_gradient_and_student_does():
  apply_fn, s_vars, t_vars, batch = _setup()
  method = _distiller(apply_fn, [Term("kd")])
  trainable, frozen, extra = method.init(jax.random.PRNGKey(0), {"student": s_vars,
                                                                 "teacher": t_vars}, batch)
  loss = lambda t, f: method.loss(t, f, extra, batch, 0, jax.random.PRNGKey(0))[0]
  t_grads = jax.grad(loss, argnums=1)(trainable, frozen)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(t_grads))
  grads = jax.grad(loss)(trainable, frozen)
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["student"])) > 0


def test_train_step_matches_manual_sgd_and_updates_batch_stats():
  apply_fn, s_vars, t_vars, batch = _setup()
  tx = optax.sgd(0.1)
  method = _distiller(apply_fn, [Term("ce", weight=0.5), Term("kd", weight=0.5)])
  trainable, frozen, extra = method.init(jax.random.PRNGKey(0), {"student": s_vars,
                                                                 "teacher": t_vars}, batch)
  state = TrainState.create(tx, trainable, frozen, extra)
  new_state, metrics = jax.jit(make_train_step(method, tx))(state, batch, jax.random.PRNGKey(0))
  grads, (_, new_extra) = jax.grad(method.loss, has_aux=True)(
      trainable, frozen, extra, batch, 0, jax.random.fold_in(jax.random.PRNGKey(0), 0))
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.trainable, expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new_state.extra, new_extra)
  assert int(new_state.step) == 1
  stats = lambda e: e["model_state"]["student"]["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(stats(new_state.extra), stats(extra))
  assert set(metrics) >= {"train/loss", "train/accuracy", "terms/ce", "terms/kd", "grads/l2"}


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
