"""bf16 compute with float32 master params and loss: the digits student still learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from kd_jax import models
from kd_jax.distiller import Distiller, Term
from kd_jax.precision import compute_dtype
from kd_jax.step import TrainState, make_eval_step, make_train_step
from kd_jax.trainer import student_variables


def _digits():
  digits = load_digits()
  images = (digits.images[..., None] / 16.0 - 0.5).astype(np.float32)
  labels = digits.target.astype(np.int32)
  return (images[:1200], labels[:1200]), (images[1200:], labels[1200:])


def test_compute_dtype_names_the_field():
  assert compute_dtype("bfloat16") == jnp.bfloat16
  assert compute_dtype("float32") == jnp.float32
  with pytest.raises(ValueError, match="precision='float16'"):
    compute_dtype("float16")


def test_bf16_student_trains_with_f32_master_params_and_loss():
  (train_x, train_y), (test_x, test_y) = _digits()
  dtype = compute_dtype("bfloat16")
  student = models.create_model("digits_cnn_student", num_classes=10, dtype=dtype)
  teacher = models.create_model("digits_cnn_teacher", num_classes=10, dtype=dtype)
  params, model_state = models.init_model(student, jax.random.PRNGKey(0), (1, 8, 8, 1))
  t_params, t_state = models.init_model(teacher, jax.random.PRNGKey(1), (1, 8, 8, 1))
  student_apply, teacher_apply = models.make_apply_fn(student), models.make_apply_fn(teacher)
  # KD weight 0.1 so the (untrained) teacher's KD term flows through the bf16 path without
  # dominating the label signal.
  distiller = Distiller(student_apply, [Term("ce", weight=0.9),
                                        Term("kd", weight=0.1, hparams={"temperature": 4.0})],
                        {"teacher": teacher_apply})
  tx = optax.sgd(0.1, momentum=0.9)
  step = jax.jit(make_train_step(distiller, tx), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(student_apply))

  def accuracy(state):
    sums = eval_step(student_variables(state), {"image": test_x, "label": test_y})
    return float(sums["eval/correct"] / sums["eval/count"])

  out, _ = student_apply({"params": params, **model_state}, test_x[:4], train=False)
  assert out.features["stage1"].dtype == jnp.bfloat16  # compute really is bf16

  state = TrainState.create(tx, *distiller.init(
      jax.random.PRNGKey(2), {"student": {"params": params, **model_state},
                              "teacher": {"params": t_params, **t_state}},
      {"image": train_x[:64], "label": train_y[:64]}))
  accuracy_before = accuracy(state)
  rs = np.random.RandomState(0)
  losses = []
  for _ in range(3):  # epochs
    for idx in np.array_split(rs.permutation(len(train_x)), len(train_x) // 64):
      state, metrics = step(state, {"image": train_x[idx], "label": train_y[idx]},
                            jax.random.PRNGKey(0))
      losses.append(metrics["train/loss"])
  assert metrics["train/loss"].dtype == jnp.float32
  assert metrics["terms/kd"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.trainable, state.opt_state,
                                                              state.frozen, state.extra)))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert np.isfinite(last) and last < 0.5 * first
  assert accuracy(state) > accuracy_before + 0.5
