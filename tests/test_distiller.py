"""The general step and the term-based distiller: every registered loss from a config, learnable
parts, loss state, traced hyperparameters, several optimizers, views, non-linen models."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import digits_kd
from kd_jax import checkpoint, data, kd_job, losses, models, trainer
from kd_jax.distiller import Distiller, Term, supervised
from kd_jax.models.output import ModelOutput
from kd_jax.step import TrainState, make_train_step, per_part_optimizer

NUM_STEPS = 3


@functools.cache
def _pair(pair: str):
  """Teacher and student apply functions and variables of the digits config's `pair`."""
  config = digits_kd.get_config(f"pair={pair}")
  built = []
  for k, group in enumerate((config.teacher, config.student)):
    module = models.create_model(group.model, num_classes=10, **group.model_kwargs.to_dict())
    params, state = models.init_model(module, jax.random.key(k), (1, 8, 8, 1))
    built.append((models.make_apply_fn(module), {"params": params, **state}))
  return built


@pytest.fixture(scope="module")
def digits_batches(digits_data_dir):
  source = data.open_source("digits", "train", digits_data_dir)
  info = data.dataset_info("digits", digits_data_dir)
  batches = data.train_batches(source, batch_size=16, seed=0, mean=info.mean, std=info.std,
                               prefetch=0)
  return [next(batches) for _ in range(NUM_STEPS)], len(source)


def _run(distiller, variables, batches, tx=optax.sgd(0.01, momentum=0.9)):
  """A few jitted steps; returns the first and last state and the metrics."""
  trainable, frozen, extra = distiller.init(jax.random.key(1), variables, batches[0])
  tx = per_part_optimizer(trainable, tx)
  state = first = TrainState.create(tx, trainable, frozen, extra)
  step = jax.jit(make_train_step(distiller, tx))
  history = []
  for batch in batches:
    state, metrics = step(state, batch, jax.random.key(2))
    history.append(jax.device_get(metrics))
  return first, state, history


def _pair_for(name: str) -> str:
  return "vit" if name.startswith("minilm") else "cnn"


@pytest.mark.parametrize("name", losses.list_losses())
def test_every_registered_loss_trains_from_the_digits_config(name, digits_batches):
  assert name in digits_kd.TERMS, (
      f"register {name!r}'s taps and weight in configs/digits_kd.py TERMS so it runs from a config")
  batches, num_data = digits_batches
  pair = _pair_for(name)
  config = digits_kd.get_config(f"pair={pair},terms={name}")
  (t_apply, t_vars), (s_apply, s_vars) = _pair(pair)
  distiller = Distiller(s_apply, kd_job.distill_terms(config), {"teacher": t_apply},
                        num_data=num_data)
  first, last, history = _run(distiller, {"student": s_vars, "teacher": t_vars}, batches)
  for metrics in history:
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics[f"terms/{name}"])
  # Every trainable part (student and the loss's own modules) moved; the teacher did not.
  for part in first.trainable:
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first.trainable[part],
                         last.trainable[part])
    assert max(jax.tree.leaves(moved)) > 0, f"{part} did not train"
  chex.assert_trees_all_equal(first.frozen, last.frozen)


def test_hyperparameter_the_loss_does_not_take_names_the_loss_and_its_hyperparameters():
  with pytest.raises(ValueError, match=r"distill.terms\[1\] \(sp\).*'temperature'.*its hyperpar"
                                       r"ameters are: p="):
    Distiller(lambda *a, **k: None, [Term("ce"), Term("sp", hparams={"temperature": 4.0})],
              {"teacher": None})


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"distill.terms\[0\] has unknown keys \['wieght'\].*loss"):
    Term.from_config({"loss": "kd", "wieght": 1.0}, "distill.terms[0]")
  with pytest.raises(ValueError, match=r"adapter='conv9'.*linear"):
    Distiller(None, [Term("fitnet", adapter="conv9")], {"teacher": None})
  with pytest.raises(ValueError, match=r"teacher_name \['ema'\] is not a frozen network"):
    Distiller(None, [Term("kd", teacher_name="ema")], {"teacher": None})
  with pytest.raises(ValueError, match=r"options \['embed'\] are unknown; valid: embed_dim"):
    Distiller(None, [Term("crd", options={"embed": 3})], {"teacher": None}, num_data=10)


def test_bad_tap_lists_the_model_taps(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("cnn")
  distiller = Distiller(s_apply, [Term("fitnet", student="stage3", teacher="stage2")],
                        {"teacher": t_apply})
  with pytest.raises(ValueError, match=r"\(fitnet\).*no feature 'stage3'.*logits, pre_logits, "
                                       r"stage1, stage2"):
    distiller.init(jax.random.key(0), {"student": s_vars, "teacher": t_vars}, batches[0])


def test_ce_plus_kd_terms_equal_the_hinton_objective(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("mlp")
  distiller = Distiller(s_apply, [Term("ce", weight=0.1),
                                  Term("kd", weight=0.9, hparams={"temperature": 4.0})],
                        {"teacher": t_apply})
  trainable, frozen, extra = distiller.init(jax.random.key(0), {"student": s_vars,
                                                                "teacher": t_vars}, batches[0])
  loss, (metrics, _) = distiller.loss(trainable, frozen, extra, batches[0], 0, jax.random.key(0))
  s, _ = s_apply(s_vars, batches[0]["image"], train=True)
  t, _ = t_apply(t_vars, batches[0]["image"], train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(s.logits, batches[0]["label"]).mean()
  expected = 0.1 * ce + 0.9 * losses.kd(s.logits, t.logits, temperature=4.0).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["terms/ce"], ce, rtol=1e-6)


def test_warmup_weight_and_an_annealed_temperature_inside_the_jitted_step(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("mlp")
  anneal = lambda step: 8.0 - 2.0 * step  # a schedule of the step, traced inside the step
  distiller = Distiller(s_apply, [Term("kd", weight=2.0, warmup_steps=4,
                                       hparams={"temperature": anneal})], {"teacher": t_apply})
  _, _, history = _run(distiller, {"student": s_vars, "teacher": t_vars}, batches)
  np.testing.assert_allclose([m["terms/kd/weight"] for m in history], [0.0, 0.5, 1.0])
  s, _ = s_apply(s_vars, batches[0]["image"], train=True)
  t, _ = t_apply(t_vars, batches[0]["image"], train=False)
  np.testing.assert_allclose(history[0]["terms/kd"],
                             losses.kd(s.logits, t.logits, temperature=8.0).mean(), rtol=1e-5)


def test_step_traces_once(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("cnn")
  distiller = Distiller(s_apply, [Term("ce"), Term("fitnet", student="stage1", teacher="stage2")],
                        {"teacher": t_apply})
  trainable, frozen, extra = distiller.init(jax.random.key(0), {"student": s_vars,
                                                                "teacher": t_vars}, batches[0])
  tx = per_part_optimizer(trainable, optax.sgd(0.1))
  # Copies: the step donates its state, and the cached variables are shared between tests.
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  step = jax.jit(chex.assert_max_traces(make_train_step(distiller, tx), n=1), donate_argnums=0)
  for batch in batches:
    state, _ = step(state, batch, jax.random.key(0))
  assert int(state.step) == NUM_STEPS


def test_adapters_are_checkpointed_and_restore_with_their_shapes_checked(digits_batches, tmp_path):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("cnn")

  def final_state(adapter):
    distiller = Distiller(s_apply, [Term("fitnet", student="stage1", teacher="stage2",
                                         adapter=adapter)], {"teacher": t_apply})
    return _run(distiller, {"student": s_vars, "teacher": t_vars}, batches)[1]

  state = final_state("auto")
  assert state.trainable["fitnet"]["adapter0"]  # FitNet's regressor, with BatchNorm state
  assert state.extra["model_state"]["fitnet"]["batch_stats"]
  ckpt = checkpoint.Checkpointer(str(tmp_path), {"model": "digits_cnn_student"})
  ckpt.save(NUM_STEPS, state)
  ckpt.wait()
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  chex.assert_trees_all_equal(restored, state)
  # A run configured with another adapter (a 1×1 linear map) cannot load the saved regressor.
  with pytest.raises(checkpoint.CheckpointError):
    ckpt.restore(final_state("linear"))
  ckpt.close()


def test_adversarial_discriminator_climbs_the_loss_the_student_descends(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("mlp")
  variables = {"student": s_vars, "teacher": t_vars}
  results = {}
  for adversarial in (False, True):
    # Without the reference's final ReLU, which can leave an untrained discriminator with no
    # gradient at all.
    distiller = Distiller(s_apply, [Term("meal_v2_discriminator", options={
        "adversarial": adversarial, "final_relu": False})], {"teacher": t_apply})
    assert distiller.ascending_parts == (("meal_v2_discriminator",) if adversarial else ())
    trainable, frozen, extra = distiller.init(jax.random.key(0), variables, batches[0])
    stage = trainer.Stage("s", distiller, variables, {}, optax.sgd(0.1), 1)
    state, tx = trainer.init_state(stage, batches[0], 0)
    new, _ = jax.jit(make_train_step(distiller, tx))(state, batches[0], jax.random.key(0))
    grads = jax.grad(lambda t: distiller.loss(t, frozen, extra, batches[0], 0,
                                              jax.random.fold_in(jax.random.key(0), 0))[0])(
                                                  state.trainable)
    results[adversarial] = (state, new, grads)
  for adversarial, (old, new, grads) in results.items():
    d_old, d_new = (s.trainable["meal_v2_discriminator"] for s in (old, new))
    d_grad = grads["meal_v2_discriminator"]
    direction = jax.tree.map(lambda a, b, g: jnp.vdot(b - a, g), d_old, d_new, d_grad)
    total = sum(jax.tree.leaves(direction))
    # Reference mode: both descend the BCE. Adversarial: the term is −BCE for the student and
    # the discriminator ascends it, i.e. descends the BCE.
    assert (total > 0) if adversarial else (total < 0)


def test_stacked_teachers_need_no_adapter_and_average_in_probability_space(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("mlp")
  distiller = Distiller(s_apply, [Term("meal_v2", teacher_name=("a", "b"))],
                        {"a": t_apply, "b": t_apply})
  other = jax.tree.map(lambda x: -x, t_vars)
  trainable, frozen, extra = distiller.init(
      jax.random.key(0), {"student": s_vars, "a": t_vars, "b": other}, batches[0])
  assert set(trainable) == {"student"}  # no adapter on the logits
  _, (metrics, _) = distiller.loss(trainable, frozen, extra, batches[0], 0, jax.random.key(0))
  s, _ = s_apply(s_vars, batches[0]["image"], train=True)
  t = jnp.stack([t_apply(v, batches[0]["image"], train=False)[0].logits for v in (t_vars, other)])
  np.testing.assert_allclose(metrics["terms/meal_v2"], losses.meal_v2(s.logits, t).mean(),
                             rtol=1e-6)


def test_two_views_feed_their_terms(digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), (s_apply, s_vars) = _pair("mlp")
  batch = {**batches[0], "image_strong": batches[0]["image"][:, :, ::-1]}  # mirrored
  distiller = Distiller(s_apply, [Term("kd", name="weak"), Term("kd", name="strong",
                                                                view="image_strong")],
                        {"teacher": t_apply})
  trainable, frozen, extra = distiller.init(jax.random.key(0), {"student": s_vars,
                                                                "teacher": t_vars}, batch)
  _, (metrics, _) = distiller.loss(trainable, frozen, extra, batch, 0, jax.random.key(0))
  flipped = {**batch, "image": batch["image_strong"], "image_strong": batch["image"]}
  _, (swapped, _) = distiller.loss(trainable, frozen, extra, flipped, 0, jax.random.key(0))
  np.testing.assert_allclose(metrics["terms/strong"], swapped["terms/weak"], rtol=1e-6)
  assert not np.isclose(metrics["terms/strong"], metrics["terms/weak"])
  with pytest.raises(ValueError, match="no view 'image_strong'"):
    distiller.loss(trainable, frozen, extra, batches[0], 0, jax.random.key(0))


class _NNXStudent(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(h), h


def _nnx_apply_fn(module: nnx.Module):
  """A kd_jax apply function for an NNX module: its params are the `nnx.split` state."""
  graphdef, params = nnx.split(module)

  def apply_fn(variables, x, *, train, rngs=None):
    del train, rngs
    logits, hidden = nnx.merge(graphdef, variables["params"])(x)
    return ModelOutput(logits, {"pre_logits": hidden}), {}

  return apply_fn, {"params": params}


def _plain_apply(variables, x, *, train, rngs=None):
  """A model written as a plain function: one linear layer."""
  del train, rngs
  flat = x.reshape(x.shape[0], -1)
  return ModelOutput(flat @ variables["params"]["w"] + variables["params"]["b"],
                     {"pre_logits": flat}), {}


@pytest.mark.parametrize("kind", ["nnx", "plain"])
def test_students_that_are_not_linen_modules_distill_from_a_linen_teacher(kind, digits_batches):
  batches, _ = digits_batches
  (t_apply, t_vars), _ = _pair("cnn")
  if kind == "nnx":
    s_apply, s_vars = _nnx_apply_fn(_NNXStudent(nnx.Rngs(0)))
  else:
    s_apply = _plain_apply
    s_vars = {"params": {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}}
  distiller = Distiller(s_apply, [Term("ce", weight=0.1), Term("kd", weight=0.9),
                                  Term("rkd", student="pre_logits", teacher="pre_logits")],
                        {"teacher": t_apply})
  first, last, history = _run(distiller, {"student": s_vars, "teacher": t_vars}, batches * 3)
  assert history[-1]["terms/kd"] < history[0]["terms/kd"]
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, first.trainable, last.trainable))


def test_supervised_method_is_plain_cross_entropy(digits_batches):
  batches, _ = digits_batches
  _, (s_apply, s_vars) = _pair("mlp")
  method = supervised(s_apply)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": s_vars}, batches[0])
  loss, _ = method.loss(trainable, frozen, extra, batches[0], 0, jax.random.key(0))
  s, _ = s_apply(s_vars, batches[0]["image"], train=True)
  np.testing.assert_allclose(
      loss, optax.softmax_cross_entropy_with_integer_labels(s.logits, batches[0]["label"]).mean(),
      rtol=1e-6)
  assert frozen == {}
