"""Multi-teacher regime: probability-space averaging, per-teacher weights, MTARD balancing in the
step, bad input, and kill-and-resume through `trainer.train`."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses
from kd_jax.distiller import Distiller, Term
from kd_jax.regimes import multi_teacher
from kd_jax.regimes.multi_teacher import MTARDBalance, MultiTeacher
from kd_jax.step import TrainState, make_train_step, per_part_optimizer


def _student_grad(method, variables, batch):
  """The loss, metrics and gradient w.r.t. the student of `method` at its initial state."""
  trainable, frozen, extra = method.init(jax.random.key(0), variables, batch)
  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(
      trainable, frozen, extra, batch, 0, jax.random.key(0))
  return loss, metrics, grads["student"]


def test_equal_weights_with_identical_teachers_equal_single_teacher_kd(model, batches):
  (t_apply, t_vars), (s_apply, s_vars) = model("mlp", seed=1, hidden_sizes=(64,)), model(
      "mlp", seed=2, hidden_sizes=(32,))
  multi = MultiTeacher(s_apply, {"teacher0": t_apply, "teacher1": t_apply},
                       terms=[Term("ce", weight=0.1)], kd_weight=0.9, temperature=4.0)
  single = Distiller(s_apply, [Term("ce", weight=0.1),
                               Term("kd", weight=0.9, hparams={"temperature": 4.0})],
                     {"teacher": t_apply})
  loss, metrics, grad = _student_grad(
      multi, {"student": s_vars, "teacher0": t_vars, "teacher1": t_vars}, batches[0])
  expected_loss, expected, expected_grad = _student_grad(
      single, {"student": s_vars, "teacher": t_vars}, batches[0])
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  chex.assert_trees_all_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
  for name in ("teacher0", "teacher1"):  # each teacher's term is reported
    np.testing.assert_allclose(metrics[f"terms/kd_{name}"], expected["terms/kd"], rtol=1e-6)


def test_weighted_teachers_of_two_architectures_average_soft_targets_in_probability_space(
    model, batches):
  (a_apply, a_vars), (b_apply, b_vars) = model("digits_cnn_teacher", seed=3), model(
      "mlp", seed=4, hidden_sizes=(128,))
  s_apply, s_vars = model("mlp", seed=2, hidden_sizes=(32,))
  variables = {"student": s_vars, "teacher0": a_vars, "teacher1": b_vars}
  teachers = {"teacher0": a_apply, "teacher1": b_apply}
  batch = batches[0]
  t = 2.0
  _, metrics, grad = _student_grad(
      MultiTeacher(s_apply, teachers, terms=(), weights=(3.0, 1.0), temperature=t), variables,
      batch)
  logits = {n: apply(variables[n], batch["image"], train=False)[0].logits
            for n, apply in teachers.items()}
  for name in teachers:
    np.testing.assert_allclose(
        metrics[f"terms/kd_{name}"],
        losses.kd(s_apply(s_vars, batch["image"], train=True)[0].logits, logits[name],
                  temperature=t).mean(), rtol=1e-6)

  def fused(params, temperature, weights):  # T²·KL(Σ_k w_k p_k ‖ p_s), one averaged target
    student = s_apply({"params": params}, batch["image"], train=True)[0].logits / temperature
    target = sum(w * jax.nn.softmax(logits[n] / temperature) for w, n in zip(weights, teachers))
    return temperature**2 * jnp.mean(jnp.sum(
        target * (jnp.log(target) - jax.nn.log_softmax(student)), -1))

  chex.assert_trees_all_close(grad, jax.jit(jax.grad(fused))(s_vars["params"], t, (0.75, 0.25)),
                              rtol=1e-4, atol=1e-7)
  # Equal weights at T = 1: MEAL V2's loss on the stacked teachers (same student gradient).
  _, _, grad = _student_grad(MultiTeacher(s_apply, teachers, terms=(), temperature=1.0),
                             variables, batch)
  # adapter="none": the distiller compares the student's [B, C] with the stacked [K, B, C] and
  # would otherwise put a linear adapter on the student's logits.
  meal = Distiller(s_apply, [Term("meal_v2", teacher_name=("teacher0", "teacher1"),
                                  adapter="none")], teachers)
  chex.assert_trees_all_close(grad, _student_grad(meal, variables, batch)[2], rtol=1e-4,
                              atol=1e-7)


def test_mtard_weights_stay_on_the_simplex_and_favour_the_slower_teacher():
  balance = MTARDBalance(weight_rate=0.5)
  state = balance.init(jnp.array([0.5, 0.5]))
  state = balance.update(state, jnp.array([2.0, 4.0]), jnp.ones(2), step=0)
  np.testing.assert_allclose(state["initial_losses"], [2.0, 4.0])  # step 0 sets L_k(0)
  np.testing.assert_allclose(state["weights"], [0.5, 0.5])  # both at 100% of L_k(0)
  # Teacher 0's term fell to 50% of its start, teacher 1's only to 90%: teacher 1 gains weight.
  state = balance.update(state, jnp.array([1.0, 3.6]), jnp.ones(2), step=7)
  target = np.array([0.5, 0.9]) / 1.4
  np.testing.assert_allclose(state["weights"], 0.5 - 0.5 * (0.5 - target), rtol=1e-6)
  assert state["weights"][1] > 0.5 > state["weights"][0]
  np.testing.assert_allclose(state["weights"].sum(), 1.0, rtol=1e-6)


def test_mtard_temperatures_follow_the_entropy_ratio_within_bounds():
  balance = MTARDBalance(temperature_rate=0.25, min_temperature=0.5, max_temperature=1.25)
  state = balance.init(jnp.ones(3) / 3)
  entropies = jnp.array([0.1, 2.0, 0.9])  # mean 1: sharp, soft, sharp
  state = balance.update(state, jnp.ones(3), entropies, step=0)
  np.testing.assert_allclose(state["temperatures"], [1.25, 0.75, 1.25])  # softened, sharpened
  state = balance.update(state, jnp.ones(3), entropies, step=1)
  np.testing.assert_allclose(state["temperatures"], [1.25, 0.5, 1.25])  # clipped at both ends


def test_mtard_balancing_runs_inside_the_step_which_traces_once(model, batches):
  s_apply, s_vars = model("mlp", seed=2, hidden_sizes=(32,))
  (a_apply, a_vars), (b_apply, b_vars) = model("digits_cnn_teacher", seed=3), model(
      "mlp", seed=4, hidden_sizes=(128,))
  method = MultiTeacher(s_apply, {"teacher0": a_apply, "teacher1": b_apply},
                        balance=MTARDBalance(weight_rate=0.5, temperature_rate=0.5,
                                             min_temperature=0.5), temperature=1.0)
  trainable, frozen, extra = method.init(
      jax.random.key(0), {"student": s_vars, "teacher0": a_vars, "teacher1": b_vars}, batches[0])
  tx = per_part_optimizer(trainable, optax.sgd(0.5))
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  step = jax.jit(chex.assert_max_traces(make_train_step(method, tx), n=1), donate_argnums=0)
  history = []
  for batch in batches * 2:
    old = jax.device_get(state.extra["multi_teacher"])
    state, metrics = step(state, batch, jax.random.key(0))
    history.append((old, jax.device_get(state.extra["multi_teacher"]), jax.device_get(metrics)))
  initial = np.array([history[0][2][f"terms/kd_teacher{k}"] for k in range(2)])
  for old, new, metrics in history:
    np.testing.assert_allclose(new["weights"].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(new["initial_losses"], initial)
    # Towards L̂_k / Σ L̂: more weight for the teacher whose term decreased least since step 0.
    relative = np.array([metrics[f"terms/kd_teacher{k}"] for k in range(2)]) / initial
    np.testing.assert_allclose(
        new["weights"], old["weights"] + 0.5 * (relative / relative.sum() - old["weights"]),
        rtol=1e-5)
    entropy = [metrics[f"multi_teacher/teacher{k}/entropy"] for k in range(2)]
    softer = int(np.argmax(entropy))  # sharpened (or at the floor), the other softened
    assert new["temperatures"][softer] == max(old["temperatures"][softer] - 0.5, 0.5)
    assert new["temperatures"][1 - softer] == old["temperatures"][1 - softer] + 0.5
    np.testing.assert_allclose(metrics["multi_teacher/teacher0/weight"], new["weights"][0])
  assert int(state.step) == 6
  chex.assert_trees_all_equal(state.frozen, frozen)


def test_bad_input_is_named(model, batches):
  s_apply, s_vars = model("mlp", seed=2, hidden_sizes=(32,))
  t_apply, t_vars = model("mlp", seed=1, hidden_sizes=(64,))
  with pytest.raises(ValueError, match="no teachers"):
    MultiTeacher(s_apply, {})
  five_apply, five_vars = model("mlp", classes=5, seed=1, hidden_sizes=(64,))
  method = MultiTeacher(s_apply, {"teacher0": t_apply, "teacher1": five_apply})
  with pytest.raises(ValueError, match=r"class counts differ \(student 10, teacher0 10, "
                                       r"teacher1 5\)"):
    method.init(jax.random.key(0), {"student": s_vars, "teacher0": t_vars, "teacher1": five_vars},
                batches[0])
  with pytest.raises(ValueError, match=r"no variables for \['teacher1'\]"):
    method.init(jax.random.key(0), {"student": s_vars, "teacher0": t_vars}, batches[0])
  teachers = {"teacher0": t_apply, "teacher1": t_apply}
  for weights in ((1.0,), (1.0, -1.0), (0.0, 0.0), (1.0, float("nan"))):
    with pytest.raises(ValueError, match=r"weights must be 2 non-negative numbers \(one per "
                                         r"teacher: teacher0, teacher1\)"):
      MultiTeacher(s_apply, teachers, weights=weights)
  with pytest.raises(ValueError, match=r"weight_rate must be in \(0, 1\], got 1.5"):
    MTARDBalance(weight_rate=1.5)
  with pytest.raises(ValueError, match=r"max_temperature must be >= min_temperature"):
    MTARDBalance(min_temperature=2.0, max_temperature=1.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    MultiTeacher(s_apply, teachers, temperature=0.0)
  with pytest.raises(ValueError, match=r"\(fitnet\) read a teacher on another view"):
    MultiTeacher(s_apply, teachers, terms=[Term("fitnet", teacher_name="teacher0",
                                                view="image_strong")])
  with pytest.raises(ValueError, match=r"teacher_name \['teacher'\] is not a frozen network; "
                                       "there are: teacher0, teacher1"):
    MultiTeacher(s_apply, teachers, terms=[Term("ce"), Term("fitnet")])


def test_kill_and_resume_through_the_trainer_is_identical(model, resumed_equals_uninterrupted):
  """Balanced teachers plus MEAL V2's adversarial discriminator, trained by `trainer.train`."""
  student = model("mlp", seed=2, hidden_sizes=(32,))
  teachers = {"teacher0": model("digits_cnn_teacher", seed=3),
              "teacher1": model("mlp", seed=4, hidden_sizes=(128,))}
  discriminator = Term("meal_v2_discriminator", teacher_name=("teacher0", "teacher1"),
                       options={"adversarial": True, "final_relu": False})
  state = resumed_equals_uninterrupted(lambda steps: multi_teacher.stage(
      "multi_teacher", student, teachers, tx=optax.sgd(0.05, momentum=0.9), num_steps=steps,
      terms=[Term("ce"), discriminator], balance=MTARDBalance(weight_rate=0.5)))
  assert set(state.trainable) == {"student", "meal_v2_discriminator"}
  assert state.frozen == {}  # fixed teachers are not checkpointed
  np.testing.assert_allclose(state.extra["multi_teacher"]["weights"].sum(), 1.0, rtol=1e-6)
  assert not np.allclose(state.extra["multi_teacher"]["weights"], 0.5)
