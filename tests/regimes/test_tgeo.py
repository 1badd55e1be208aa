"""TGeo-KD: per-example fusion ratios, the fused loss at α = 1 and α = 0, the fusion network's
gradient through the virtual step, a student gradient blind to the held-out rows, the running
teacher class means, bad input, and kill-and-resume through `trainer.train`."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses
from kd_jax.models.mlp import MLP
from kd_jax.regimes import tgeo
from kd_jax.regimes.tgeo import TGeoKD

LR, T = 0.5, 2.0


@pytest.fixture(scope="module")
def train_batches(train_batches):
  """The digits batches of 16 split into 8 training rows and 8 held-out rows."""
  split = lambda b: tgeo.attach_heldout({k: v[:8] for k, v in b.items()},
                                        {k: v[8:] for k, v in b.items()})
  return lambda start: map(split, train_batches(start))


@pytest.fixture(scope="module")
def nets(model):
  return model("mlp", seed=1, hidden_sizes=(32,)), model("mlp", seed=2, hidden_sizes=(64,))


@pytest.fixture(scope="module")
def prepared(nets, batches):
  """`(trainable, loss_and_grads)`: the initial trainable parts, and the loss's metrics and
  gradient `loss_and_grads(trainable, batch) -> (metrics, grads)` (jitted once) at the initial
  frozen and extra state."""
  (s_apply, s_vars), (t_apply, t_vars) = nets
  method = TGeoKD(s_apply, t_apply, lookahead_lr=LR, temperature=T)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": s_vars, "teacher": t_vars},
                                         batches[0])
  value_and_grad = jax.jit(jax.value_and_grad(method.loss, has_aux=True))

  def loss_and_grads(trainable, batch):
    (_, (metrics, _)), grads = value_and_grad(trainable, frozen, extra, batch, 0,
                                              jax.random.key(0))
    return metrics, grads

  return trainable, loss_and_grads


def _with_alpha(trainable, logit):
  """The fusion network fixed to α = sigmoid(logit) on every example."""
  head = trainable["fusion"]["head"]
  fusion = {**trainable["fusion"], "head": {"kernel": jnp.zeros_like(head["kernel"]),
                                            "bias": jnp.full_like(head["bias"], logit)}}
  return {**trainable, "fusion": fusion}


def _reference(nets, batch):
  """Hand-written L_S(θ, α) and L_H(ω) on `batch` from a fresh state (t̄: this batch's means)."""
  (s_apply, s_vars), (t_apply, t_vars) = nets
  x, y = batch["image"], batch["label"]
  t = t_apply(t_vars, x, train=False)[0].logits
  p_t, g = jax.nn.softmax(t), jax.nn.one_hot(y, 10)
  t_bar = ((g.T @ p_t) / jnp.maximum(g.sum(0), 1)[:, None])[y]
  fusion = MLP(num_classes=1, hidden_sizes=(64,))

  def student_loss(params, alpha):
    s = s_apply({"params": params}, x, train=True)[0].logits
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y)
    kd = T**2 * jnp.sum(jax.nn.softmax(t / T) * (jax.nn.log_softmax(t / T)
                                                 - jax.nn.log_softmax(s / T)), -1)
    return jnp.mean(alpha * ce + (1 - alpha) * kd)

  def alpha(fusion_params):
    p_s = jax.nn.softmax(s_apply(s_vars, x, train=True)[0].logits)
    r = jnp.concatenate([p_s - p_t, p_t - g, g - p_s, p_s - t_bar, t_bar - g], -1)
    return jax.nn.sigmoid(fusion.apply({"params": fusion_params}, r, train=False).logits[:, 0])

  def heldout_loss(fusion_params):
    theta = s_vars["params"]
    virtual = jax.tree.map(lambda p, d: p - LR * d, theta,
                           jax.grad(student_loss)(theta, alpha(fusion_params)))
    logits = s_apply({"params": virtual}, batch["heldout_image"], train=True)[0].logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["heldout_label"]).mean()

  return student_loss, alpha, heldout_loss


def test_alpha_is_per_example_in_the_open_unit_interval(nets, batches, prepared):
  trainable, loss_and_grads = prepared
  metrics, _ = loss_and_grads(trainable, batches[0])
  _, alpha, _ = _reference(nets, batches[0])
  a = alpha(trainable["fusion"])
  assert a.shape == (8,) and np.all((a > 0) & (a < 1)) and np.std(a) > 1e-4
  np.testing.assert_allclose(metrics["tgeo/alpha"], a.mean(), rtol=1e-5)


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_kd(nets, batches, prepared):
  batch = batches[0]
  trainable, loss_and_grads = prepared
  (s_apply, s_vars), (t_apply, t_vars) = nets
  s = s_apply(s_vars, batch["image"], train=True)[0].logits
  t = t_apply(t_vars, batch["image"], train=False)[0].logits
  ce = optax.softmax_cross_entropy_with_integer_labels(s, batch["label"]).mean()
  kd = losses.kd(s, t, temperature=T).mean()
  for logit, expected in ((100.0, ce), (-100.0, kd)):
    metrics, _ = loss_and_grads(_with_alpha(trainable, logit), batch)
    np.testing.assert_allclose(metrics["tgeo/alpha"], 1.0 if logit > 0 else 0.0, atol=1e-30)
    np.testing.assert_allclose(metrics["terms/fused"], expected, rtol=1e-6)
    np.testing.assert_allclose((metrics["terms/ce"], metrics["terms/kd"]), (ce, kd), rtol=1e-6)


def test_fusion_gradient_is_autodiff_through_the_virtual_step_and_the_student_ignores_heldout(
    nets, batches, prepared):
  batch = batches[0]
  trainable, loss_and_grads = prepared
  metrics, grads = loss_and_grads(trainable, batch)
  student_loss, alpha, heldout_loss = _reference(nets, batch)
  np.testing.assert_allclose(metrics["terms/heldout"], heldout_loss(trainable["fusion"]),
                             rtol=1e-5)
  chex.assert_trees_all_close(grads["fusion"], jax.jit(jax.grad(heldout_loss))(
      trainable["fusion"]), rtol=1e-5, atol=1e-7)
  fixed_alpha = alpha(trainable["fusion"])  # the student sees α as a constant
  chex.assert_trees_all_close(grads["student"], jax.grad(student_loss)(
      trainable["student"], fixed_alpha), rtol=1e-5, atol=1e-7)
  # Other held-out rows: the same student gradient, another fusion gradient.
  other = {**batch, "heldout_image": batches[1]["heldout_image"],
           "heldout_label": batches[1]["heldout_label"]}
  _, other_grads = loss_and_grads(trainable, other)
  chex.assert_trees_all_equal(other_grads["student"], grads["student"])
  assert not np.allclose(other_grads["fusion"]["head"]["kernel"], grads["fusion"]["head"]["kernel"])


def test_bad_input_is_named(model, nets, batches):
  (s_apply, s_vars), (t_apply, t_vars) = nets
  with pytest.raises(ValueError, match="tgeo: lookahead_lr must be > 0, got 0.0"):
    TGeoKD(s_apply, t_apply, lookahead_lr=0.0)
  with pytest.raises(ValueError, match="tgeo: temperature must be > 0"):
    TGeoKD(s_apply, t_apply, lookahead_lr=0.1, temperature=float("nan"))
  with pytest.raises(ValueError, match=r"tgeo: hidden_sizes must list positive widths, got \[\]"):
    TGeoKD(s_apply, t_apply, lookahead_lr=0.1, hidden_sizes=())
  method = TGeoKD(s_apply, t_apply, lookahead_lr=0.1)
  with pytest.raises(ValueError, match=r"no variables for \['teacher'\]"):
    method.init(jax.random.key(0), {"student": s_vars}, batches[0])
  bare = {k: v for k, v in batches[0].items() if not k.startswith("heldout_")}
  with pytest.raises(ValueError, match=r"tgeo: the batch has no \['heldout_image', "
                                       r"'heldout_label'\].*tgeo.attach_heldout"):
    method.init(jax.random.key(0), {"student": s_vars, "teacher": t_vars}, bare)
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": s_vars,
                                                             "teacher": t_vars}, batches[0])
  with pytest.raises(ValueError, match=r"tgeo: the batch has no \['heldout_image'"):
    method.loss(trainable, frozen, extra, bare, 0, jax.random.key(0))
  five_apply, five_vars = model("mlp", classes=5, seed=3, hidden_sizes=(16,))
  method = TGeoKD(s_apply, five_apply, lookahead_lr=0.1)
  with pytest.raises(ValueError, match=r"tgeo: the class counts differ \(student 10, "
                                       r"teacher 5\)"):
    method.init(jax.random.key(0), {"student": s_vars, "teacher": five_vars}, batches[0])


def test_kill_and_resume_is_identical_and_keeps_the_teachers_class_means(
    nets, prepared, train_batches, resumed_equals_uninterrupted):
  """Both parts train (the fusion network with its own optimizer) and t̄'s sums are the
  teacher's predictions summed per class over the 4 steps' training rows."""
  state = resumed_equals_uninterrupted(lambda steps: tgeo.stage(
      "tgeo", *nets, tx=optax.sgd(LR, momentum=0.9), fusion_tx=optax.adam(1e-2),
      num_steps=steps, lookahead_lr=LR, temperature=T))
  assert state.frozen == {}  # the fixed teacher is not checkpointed
  initial, _ = prepared
  for part in ("student", "fusion"):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), initial[part],
                         state.trainable[part])
    assert min(jax.tree.leaves(moved)) > 0, f"{part} did not train"
  _, (t_apply, t_vars) = nets
  it = train_batches(0)
  seen = [next(it) for _ in range(4)]
  one_hot = [jax.nn.one_hot(b["label"], 10) for b in seen]
  p_t = [jax.nn.softmax(t_apply(t_vars, b["image"], train=False)[0].logits) for b in seen]
  np.testing.assert_allclose(state.extra["tgeo"]["counts"], sum(g.sum(0) for g in one_hot))
  np.testing.assert_allclose(state.extra["tgeo"]["sums"],
                             sum(g.T @ p for g, p in zip(one_hot, p_t)), rtol=1e-5, atol=1e-6)
