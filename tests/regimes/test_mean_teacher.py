"""Mean teacher: EMA formula and momentum ramp, sigmoid ramp-up, threshold masks (single, dual,
score-weighted), the stratified split and its batches (no unlabeled label reaches a batch or the
step), kill-and-resume through `trainer.train`, and a short digits run."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import data, trainer
from kd_jax.regimes import mean_teacher
from kd_jax.regimes.mean_teacher import MeanTeacher
from kd_jax.step import TrainState, cross_entropy, make_train_step, per_part_optimizer

LABELED_FRACTION = 0.2


@pytest.fixture(scope="module")
def digits(digits_data_dir):
  images, labels = data.load_arrays("digits", "train", digits_data_dir)
  return images, labels, data.dataset_info("digits", digits_data_dir)


@pytest.fixture(scope="module")
def train_batches(digits):
  """Overrides the conftest's: semi-supervised digits batches (16 labeled + 32 unlabeled), which
  the conftest's `batches` and `resumed_equals_uninterrupted` then use."""
  images, labels, info = digits
  return mean_teacher.semi_supervised_batches(
      images, labels, labeled_fraction=LABELED_FRACTION, batch_size=16, unlabeled_batch_size=32,
      seed=0, mean=info.mean, std=info.std, prefetch=0)


def _distance(a, b) -> float:
  return float(optax.global_norm(jax.tree.map(lambda x, y: x - y, a, b)))


def test_ema_update_is_exact_and_momentum_ramps_to_decay(model):
  t = np.arange(1, 6)
  np.testing.assert_allclose(mean_teacher.ema_momentum(t, 0.7),  # Tarvainen: 1 − 1/(t + 1)
                             [0.5, 2 / 3, 0.7, 0.7, 0.7], rtol=1e-6)
  np.testing.assert_allclose(mean_teacher.ema_momentum(t, 0.999, warmup=100),  # Soft Teacher
                             1 - 101 / (t + 101), rtol=1e-5)
  assert float(mean_teacher.ema_momentum(10**6, 0.999, warmup=100)) == np.float32(0.999)
  apply, teacher = model("mlp", seed=1, hidden_sizes=(32,))
  student = jax.tree.map(lambda x: x + 1.0, teacher)
  m = np.float32(0.9)
  chex.assert_trees_all_equal(mean_teacher.ema_update(teacher, student, m),
                              jax.tree.map(lambda a, b: m * a + (1 - m) * b, teacher, student))
  for decay in (1.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
      MeanTeacher(apply, decay=decay)


def test_sigmoid_rampup_runs_from_exp_minus_5_to_1():
  ramp = lambda t: float(mean_teacher.sigmoid_rampup(t, 100))
  np.testing.assert_allclose([ramp(0), ramp(50), ramp(100), ramp(1000)],
                             [np.exp(-5.0), np.exp(-1.25), 1.0, 1.0], rtol=1e-6)
  assert float(mean_teacher.sigmoid_rampup(0, 0)) == 1.0


@functools.partial(jax.jit, static_argnames=("low_threshold", "score_weighting"))
def _pseudo(student, teacher, low_threshold=None, score_weighting=False):
  return mean_teacher.pseudo_label_loss(student, teacher, threshold=0.95,
                                        low_threshold=low_threshold,
                                        score_weighting=score_weighting)[0]


def test_examples_below_the_threshold_give_no_loss_and_no_gradient():
  # Teacher confidences ≈ [0.99, 0.50, 0.97, 0.30] over 3 classes.
  teacher = jnp.log(jnp.array([[0.99, 0.005, 0.005], [0.5, 0.3, 0.2], [0.015, 0.97, 0.015],
                               [0.3, 0.35, 0.35]]))
  student = jax.random.normal(jax.random.key(0), (4, 3))
  loss, grad = jax.jit(jax.value_and_grad(_pseudo))(student, teacher)
  ce = cross_entropy(student, jnp.array([0, 0, 1, 1]))
  np.testing.assert_allclose(loss, (ce[0] + ce[2]) / 4, rtol=1e-6)  # FixMatch: mean over all U
  below = jnp.array([1, 3])
  assert np.all(grad[below] == 0) and np.all(np.abs(grad[jnp.array([0, 2])]) > 0)
  low = jax.jit(jax.value_and_grad(_pseudo))(student[below], teacher[below])
  assert float(low[0]) == 0 and np.all(low[1] == 0)


def test_dual_thresholds_keep_ambiguous_examples_weighted_by_score_and_soft_teacher_normalises():
  confidence = jnp.array([0.99, 0.8, 0.5, 0.2])
  weights = lambda **kw: mean_teacher.pseudo_label_weights(confidence, threshold=0.95, **kw)
  np.testing.assert_allclose(weights(), [1, 0, 0, 0])
  np.testing.assert_allclose(weights(low_threshold=0.6), [1, 0.8, 0, 0])  # HSSDA
  np.testing.assert_allclose(weights(score_weighting=True), [0.99, 0, 0, 0])
  np.testing.assert_allclose(weights(low_threshold=0.6, score_weighting=True), [0.99, 0.8, 0, 0])
  probs = jnp.array([[0.99, 0.005, 0.005], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
  student = jax.random.normal(jax.random.key(1), (4, 3))
  ce = cross_entropy(student, jnp.argmax(probs, -1))
  np.testing.assert_allclose(_pseudo(student, jnp.log(probs), low_threshold=0.6),
                             (ce[0] + 0.8 * ce[1]) / 4, rtol=1e-5)
  np.testing.assert_allclose(
      _pseudo(student, jnp.log(probs), low_threshold=0.6, score_weighting=True),
      (0.99 * ce[0] + 0.8 * ce[1]) / 1.79, rtol=1e-5)
  with pytest.raises(ValueError, match=r"low_threshold must be in \[0, threshold=0.9\)"):
    MeanTeacher(lambda *a, **k: None, threshold=0.9, low_threshold=0.9)


def test_split_is_stratified_seeded_and_disjoint_and_validates_the_fraction(digits):
  images, labels, _ = digits
  labeled, unlabeled = mean_teacher.split_labeled(labels, 0.1, seed=0)
  assert np.intersect1d(labeled, unlabeled).size == 0
  np.testing.assert_array_equal(np.union1d(labeled, unlabeled), np.arange(len(labels)))
  np.testing.assert_array_equal(np.bincount(labels[labeled]),
                                [max(1, round(0.1 * n)) for n in np.bincount(labels)])
  np.testing.assert_array_equal(mean_teacher.split_labeled(labels, 0.1, seed=0)[0], labeled)
  assert not np.array_equal(mean_teacher.split_labeled(labels, 0.1, seed=1)[0], labeled)
  for fraction in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"labeled_fraction must be in \(0, 1\]"):
      mean_teacher.split_labeled(labels, fraction, seed=0)
  with pytest.raises(ValueError, match="leaves 0 unlabeled images"):
    mean_teacher.semi_supervised_batches(images, labels, labeled_fraction=1.0, batch_size=16,
                                         unlabeled_batch_size=16, seed=0)


def test_batches_hold_no_label_of_the_unlabeled_part_and_resume(digits, train_batches):
  images, labels, info = digits
  labeled, unlabeled = mean_teacher.split_labeled(labels, LABELED_FRACTION, seed=0)
  it = train_batches(0)
  batches = [next(it) for _ in range(3)]
  for batch in batches:
    assert set(batch) == {"image", "label", "mask", "index", "unlabeled_image", "unlabeled_index"}
    assert np.isin(batch["index"], labeled).all() and np.isin(batch["unlabeled_index"],
                                                              unlabeled).all()
    np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
    np.testing.assert_allclose(batch["unlabeled_image"], data.normalize(
        images[batch["unlabeled_index"]], info.mean, info.std))
  chex.assert_trees_all_equal(next(train_batches(2)), batches[2])


def test_the_method_refuses_batches_that_carry_unlabeled_labels(model, batches):
  apply, variables = model("mlp", seed=1, hidden_sizes=(32,))
  method = MeanTeacher(apply)
  leaky = {**batches[0], "unlabeled_label": np.zeros(32, np.int32)}
  with pytest.raises(ValueError, match=r"carries \['unlabeled_label'\]"):
    method.init(jax.random.key(0), {"student": variables}, leaky)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": variables}, batches[0])
  with pytest.raises(ValueError, match=r"carries \['unlabeled_label'\]"):
    method.loss(trainable, frozen, extra, leaky, 0, jax.random.key(0))
  with pytest.raises(ValueError, match=r"no \['unlabeled_image'\]"):
    method.loss(trainable, frozen, extra, {k: v for k, v in batches[0].items()
                                           if k != "unlabeled_image"}, 0, jax.random.key(0))


def test_kill_and_resume_through_the_trainer_is_identical_and_keeps_the_teacher(
    model, resumed_equals_uninterrupted):
  apply, variables = model("mlp", seed=1, hidden_sizes=(32,))
  make_stage = lambda steps: mean_teacher.stage(
      "mean_teacher", (apply, variables), tx=optax.sgd(0.05, momentum=0.9), num_steps=steps,
      decay=0.9, threshold=0.3, low_threshold=0.1, score_weighting=True, weak_strategy=None,
      strong_strategy="color")  # the cheapest views to compile: three compiles here
  state = resumed_equals_uninterrupted(make_stage)
  assert set(state.frozen) == {"teacher"}
  assert _distance(mean_teacher.teacher_variables(state),
                   trainer.student_variables(state)) > 0


def test_a_short_digits_run_traces_once_and_keeps_an_ema_teacher_that_tracks_the_student(
    model, train_batches):
  apply, variables = model("convnet", seed=2, depth=1, width=8, norm="batchnorm")
  method = MeanTeacher(apply, decay=0.9, threshold=0.8, low_threshold=0.5, rampup_steps=20)
  it = train_batches(0)
  batch = next(it)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": variables}, batch)
  tx = per_part_optimizer(trainable, optax.sgd(0.1, momentum=0.9))
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  initial = jax.device_get(state.frozen["teacher"])
  step = jax.jit(chex.assert_max_traces(make_train_step(method, tx), n=1), donate_argnums=0)
  history = []
  for k in range(40):
    teacher = jax.device_get(state.frozen["teacher"])
    state, metrics = step(state, batch, jax.random.key(0))
    history.append(jax.device_get(metrics))
    batch = next(it)
    if k < 3:  # θ' ← m·θ' + (1 − m)·θ over params and BatchNorm statistics
      m = min(0.9, 1 - 1 / (k + 2))  # t = k + 1 updates done
      chex.assert_trees_all_close(state.frozen["teacher"], jax.tree.map(
          lambda t, s: m * t + (1 - m) * s, teacher, trainer.student_variables(state)),
                                  rtol=1e-6, atol=1e-7)
  assert set(history[0]) >= {"terms/supervised", "terms/unsupervised", "train/unlabeled_weight",
                             "train/pseudo_label_fraction", "train/ambiguous_fraction"}
  assert not any("pseudo_label_accuracy" in name for name in history[0])
  np.testing.assert_allclose([h["train/unlabeled_weight"] for h in history[:21:20]],
                             [np.exp(-5.0), 1.0], rtol=1e-6)
  teacher, student = mean_teacher.teacher_variables(state), trainer.student_variables(state)
  assert teacher["batch_stats"]
  assert 0 < _distance(teacher, student) < 0.5 * _distance(initial, student)
  assert history[-1]["terms/supervised"] < 0.5 * history[0]["terms/supervised"]
  assert history[-1]["train/pseudo_label_fraction"] > history[0]["train/pseudo_label_fraction"]
  assert all(np.isfinite(m["train/loss"]) for m in history)
