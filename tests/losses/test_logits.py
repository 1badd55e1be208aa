"""Tests for kd_jax.losses.logits and kd_jax.losses.meal: identities, masks, gradients, dtypes,
argument checks, and parity with reference values (tests/losses/fixtures/logits_reference.npz,
made by make_logit_fixtures.py from torchdistill 1.1.5 and transcriptions of the papers' code)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.losses import logits as L
from kd_jax.losses.meal import MealV2Discriminator, meal_v2_discriminator_loss

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "logits_reference.npz")
B, C, D = 6, 5, 4


def _inputs(seed=0, batch=B, classes=C, dtype=jnp.float32):
  ks, kt, ky, kw, kf, kg, kc = jax.random.split(jax.random.key(seed), 7)
  return {
      "student_logits": (2.0 * jax.random.normal(ks, (batch, classes))).astype(dtype),
      "teacher_logits": (2.0 * jax.random.normal(kt, (batch, classes))).astype(dtype),
      "labels": jax.random.randint(ky, (batch,), 0, classes),
      "mask": jnp.ones((batch,), jnp.float32),
      "weak_logits": jax.random.normal(kw, (batch, classes)).astype(dtype),
      "student_features": jax.random.normal(kf, (batch, D)).astype(dtype),
      "teacher_features": jax.random.normal(kg, (batch, D)).astype(dtype),
      "class_means": jax.random.normal(kc, (classes, D)),
  }


def _logit_losses():
  return [name for name in losses.list_losses() if losses.get_loss(name).kind == "logits"]


@functools.cache
def _jitted(name, static_hparams):
  """The registered loss, jitted once per set of structural hyperparameters (mode strings...)."""
  return jax.jit(functools.partial(losses.get_loss(name).fn, **dict(static_hparams)))


def _call(name, inputs, **hparams):
  """Calls a registered loss on the inputs its registry entry names (and `inputs["mask"]` if it
  takes a mask); float hyperparameters are traced."""
  spec = losses.get_loss(name)
  if spec.takes_mask:
    hparams["mask"] = inputs["mask"]
  static = tuple(sorted((k, v) for k, v in hparams.items() if isinstance(v, str)))
  traced = {k: v for k, v in hparams.items() if not isinstance(v, str)}
  return _jitted(name, static)(*(inputs[k] for k in spec.inputs), **traced)


# Losses whose inputs are (student_logits, teacher_logits[, labels]) and that vanish at s = t.
ZERO_AT_EQUAL = ["kd", "reverse_kl", "jensen_shannon", "generalized_jsd", "logit_mse", "dkd", "bdkd",
                 "logit_standardized_kd", "dist", "skd_instance", "skd_direction"]
SHIFT_INVARIANT = ["kd", "reverse_kl", "jensen_shannon", "dkd", "nkd", "ofa", "dist", "meal_v2",
                   "bdkd", "logit_standardized_kd", "soft_teacher_cls", "uskd", "skd_instance"]
TEACHER_INPUT = [n for n in ("kd", "reverse_kl", "jensen_shannon", "logit_mse", "dkd", "nkd",
                             "dist", "logit_standardized_kd", "ofa", "nd", "meal_v2", "bdkd",
                             "soft_teacher_cls", "skd_instance", "skd_direction")]


def test_registry_lists_every_logit_loss():
  assert set(_logit_losses()) == {"kd", "reverse_kl", "jensen_shannon", "logit_mse", "dkd", "nkd",
                                  "uskd", "dist", "logit_standardized_kd", "ofa", "nd", "meal_v2",
                                  "meal_v2_discriminator", "bdkd", "soft_teacher_cls",
                                  "skd_instance", "skd_direction", "generalized_jsd"}
  assert "meal_v2_discriminator" in _logit_losses()
  for name in _logit_losses():
    spec = losses.get_loss(name)
    assert spec.inputs[0] in ("student_logits", "student_features", "student_scores")


@pytest.mark.parametrize("name", ZERO_AT_EQUAL)
def test_zero_when_student_equals_teacher(name):
  x = _inputs()
  x["teacher_logits"] = x["student_logits"]
  np.testing.assert_allclose(_call(name, x), 0.0, atol=2e-6)


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_invariant_to_per_example_logit_shifts(name):
  x = _inputs()
  shifted = dict(x)
  shifted["student_logits"] = x["student_logits"] + jnp.arange(B)[:, None] * 3.0
  shifted["teacher_logits"] = x["teacher_logits"] - jnp.arange(B)[:, None] * 2.0
  shifted["weak_logits"] = x["weak_logits"] + 1.5
  np.testing.assert_allclose(_call(name, shifted), _call(name, x), rtol=1e-5, atol=1e-5)


def test_kd_at_temperature_one_matches_optax():
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  expected = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
  np.testing.assert_allclose(L.kd(s, t, temperature=1.0), expected, rtol=1e-5, atol=1e-6)
  # KD = CE(student, p_t) − H(p_t); MEAL V2 with one teacher and OFA at ε=1 are that CE.
  cross_entropy = optax.softmax_cross_entropy(s, jax.nn.softmax(t))
  np.testing.assert_allclose(L.meal_v2(s, t), cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(L.ofa(s, t, x["labels"], eps=1.0), cross_entropy, rtol=1e-5)


def test_kd_temperature_scaling():
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  np.testing.assert_allclose(L.kd(s, t, temperature=3.0), 9.0 * L.kd(s / 3.0, t / 3.0,
                                                                      temperature=1.0), rtol=1e-5)


def test_reverse_kl_swaps_the_arguments_of_kd():
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  np.testing.assert_allclose(L.reverse_kl(s, t, temperature=2.0), L.kd(t, s, temperature=2.0),
                             rtol=1e-5)


def test_jensen_shannon_symmetric_and_bounded():
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  js = L.jensen_shannon(s, t)
  np.testing.assert_allclose(js, L.jensen_shannon(t, s), rtol=1e-5, atol=1e-7)
  assert np.all(js >= 0) and np.all(js <= np.log(2.0) + 1e-6)
  far = L.jensen_shannon(jnp.array([[60.0, 0.0]]), jnp.array([[0.0, 60.0]]))
  np.testing.assert_allclose(far, np.log(2.0), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposes_kd(temperature):
  # DKD paper, Eq. (3): KD = TCKD + (1 − p_t,gt)·NCKD.
  x = _inputs()
  s, t, y = x["student_logits"], x["teacher_logits"], x["labels"]
  tckd = L.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=temperature)
  nckd = L.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=temperature)
  pt_gt = jax.nn.softmax(t / temperature)[jnp.arange(B), y]
  np.testing.assert_allclose(tckd + (1.0 - pt_gt) * nckd, L.kd(s, t, temperature=temperature),
                             rtol=1e-5, atol=1e-6)


def test_soft_labels_use_their_argmax():
  x = _inputs()
  s, t, y = x["student_logits"], x["teacher_logits"], x["labels"]
  soft = 0.7 * jax.nn.one_hot(y, C) + 0.3 / C
  for fn in (L.dkd, L.nkd, L.ofa):
    np.testing.assert_allclose(fn(s, t, soft), fn(s, t, y), rtol=1e-6)


def test_nkd_without_non_target_term_is_teacher_weighted_ce():
  x = _inputs()
  s, t, y = x["student_logits"], x["teacher_logits"], x["labels"]
  rows = jnp.arange(B)
  expected = -jax.nn.softmax(t)[rows, y] * jax.nn.log_softmax(s)[rows, y]
  np.testing.assert_allclose(L.nkd(s, t, y, gamma=0.0), expected, rtol=1e-5)


def test_logit_standardized_kd_ignores_logit_scale_and_offset():
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  np.testing.assert_allclose(L.logit_standardized_kd(3.0 * s + 2.0, 0.5 * t - 1.0),
                             L.logit_standardized_kd(s, t), rtol=1e-4, atol=1e-6)


def test_bdkd_weights_follow_the_entropy_gap():
  t = jnp.array([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
  s = jnp.array([[0.5, 0.0, 0.0], [6.0, 0.0, 0.0]])  # less / more confident than the teacher
  forward, reverse = L.kd(s, t, temperature=1.0), L.reverse_kl(s, t, temperature=1.0)
  expected = jnp.array([forward[0] + 3.0 * reverse[0], 3.0 * forward[1] + reverse[1]])
  np.testing.assert_allclose(L.bdkd(s, t, temperature=1.0, balance=3.0), expected, rtol=1e-5)


def test_teacher_class_means_and_nd():
  x = _inputs()
  f, y = x["teacher_features"], x["labels"]
  mask = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
  means = L.teacher_class_means(f, y, C, mask=mask)
  for c in range(C):
    rows = np.asarray(f)[(np.asarray(y) == c) & (np.asarray(mask) == 1)]
    np.testing.assert_allclose(means[c], rows.mean(0) if len(rows) else np.zeros(D), rtol=1e-5,
                               atol=1e-6)
  # A student and teacher both equal to a scaled class center have zero ND loss.
  centers = x["class_means"]
  on_center = 2.5 * centers[y] / jnp.linalg.norm(centers[y], axis=-1, keepdims=True)
  np.testing.assert_allclose(L.nd(on_center, on_center, y, centers), 0.0, atol=1e-6)


def test_meal_v2_averages_teacher_probabilities():
  x = _inputs()
  s = x["student_logits"]
  t1, t2 = x["teacher_logits"], x["weak_logits"]
  mixed = 0.5 * (jax.nn.softmax(t1) + jax.nn.softmax(t2))
  np.testing.assert_allclose(L.meal_v2(s, jnp.stack([t1, t2])),
                             optax.softmax_cross_entropy(s, mixed), rtol=1e-5)


def test_meal_v2_discriminator_learns_only_through_its_params():
  x = _inputs()
  disc = MealV2Discriminator(reduction=2)
  params = disc.init(jax.random.key(1), x["student_logits"][:, :4])

  def loss(p):
    scores = disc.apply(p, x["student_logits"][:, :4]), disc.apply(p, x["teacher_logits"][:, :4])
    return jnp.mean(meal_v2_discriminator_loss(*scores))

  grads = jax.jit(jax.grad(loss))(params)
  assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
  with pytest.raises(ValueError, match="reduction"):
    MealV2Discriminator(reduction=8).init(jax.random.key(0), jnp.zeros((1, 10)))


@pytest.mark.parametrize("name", ["dist", "soft_teacher_cls", "skd_direction"])
def test_batch_relation_mask_equals_slicing(name):
  x = _inputs()
  mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)
  keep = np.asarray(mask, bool)
  if name == "soft_teacher_cls":
    x["labels"] = jnp.array([0, 4, 4, 2, 4, 4])  # 4 (last) is background
  masked = dict(x, mask=mask)
  sliced = {k: (v[keep] if k != "class_means" else v) for k, v in x.items()}
  sliced["mask"] = None
  np.testing.assert_allclose(_call(name, masked), _call(name, sliced), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_skd_instance_mask_removes_padding_from_the_median(mode):
  x = _inputs()
  mask = jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)
  keep = np.asarray(mask, bool)
  s, t = x["student_logits"], x["teacher_logits"]
  masked = L.skd_instance(s, t, mask=mask, mode=mode)
  np.testing.assert_allclose(masked[keep], L.skd_instance(s[keep], t[keep], mode=mode), rtol=1e-5)
  assert float(masked[~keep][0]) == 0.0


def test_skd_instance_paper_mode_is_plain_kl():
  # The paper's Eq. (1) (torchdistill mode='paper'): KL of the softened distributions, no T²,
  # no selection.
  x = _inputs()
  s, t = x["student_logits"], x["teacher_logits"]
  np.testing.assert_allclose(L.skd_instance(s, t, temperature=3.0),
                             L.kd(s, t, temperature=3.0) / 9.0, rtol=1e-6)


def test_uskd_mask_removes_padding_from_the_batch_statistic():
  x = _inputs()
  mask = jnp.array([1, 1, 0, 1, 1, 0], jnp.float32)
  keep = np.asarray(mask, bool)
  args = lambda d: (d["student_logits"], d["weak_logits"], d["labels"])
  masked = L.uskd(*args(x), mask=mask)
  sliced = L.uskd(*(a[keep] for a in args(x)))
  np.testing.assert_allclose(masked[keep], sliced, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TEACHER_INPUT)
def test_no_gradient_reaches_the_teacher(name):
  x = _inputs()
  key = "teacher_features" if name == "nd" else "teacher_logits"
  grad = jax.grad(lambda v: jnp.sum(_call(name, dict(x, **{key: v}))))(x[key])
  np.testing.assert_array_equal(grad, 0.0)


GRADIENT_CASES = [(name, {}) for name in ("kd", "reverse_kl", "jensen_shannon", "logit_mse", "dkd",
                                          "nkd", "uskd", "dist", "logit_standardized_kd", "ofa",
                                          "nd", "meal_v2", "bdkd", "soft_teacher_cls",
                                          "skd_instance", "skd_direction")]
GRADIENT_CASES += [("skd_instance", {"mode": "code"}), ("skd_direction", {"mode": "code"})]


@pytest.mark.parametrize("name, hparams", GRADIENT_CASES,
                         ids=[n + "".join(f"-{v}" for v in h.values()) for n, h in GRADIENT_CASES])
def test_gradients_match_finite_differences(name, hparams):
  with jax.enable_x64(True):
    x = _inputs(seed=3, batch=3, classes=4, dtype=jnp.float64)
    # USKD's target-term soft label is detached (as the reference), so finite differences
    # through the student logits disagree by design; check its weak-head path instead.
    key = {"nd": "student_features", "uskd": "weak_logits"}.get(name, "student_logits")
    fn = lambda v: _call(name, dict(x, **{key: v}), **hparams)
    check_grads(fn, (x[key],), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in _logit_losses() if n != "meal_v2_discriminator"])
def test_bfloat16_in_float32_out(name):
  x16 = _inputs(dtype=jnp.bfloat16)
  x32 = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in x16.items()}
  out = _call(name, x16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _call(name, x32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda s, t, y: L.kd(s, t, temperature=0.0), "temperature must be > 0, got 0.0"),
    (lambda s, t, y: L.reverse_kl(s, t, temperature=-1.0), "temperature must be > 0, got -1.0"),
    (lambda s, t, y: L.jensen_shannon(s, t, temperature=0), "temperature"),
    (lambda s, t, y: L.dkd(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: L.dkd(s, t, y, beta=-1.0), "beta must be >= 0, got -1.0"),
    (lambda s, t, y: L.nkd(s, t, y, gamma=-0.5), "gamma"),
    (lambda s, t, y: L.uskd(s, t, y, mu=-1.0), "mu"),
    (lambda s, t, y: L.dist(s, t, temperature=0.0), "temperature"),
    (lambda s, t, y: L.logit_standardized_kd(s, t, temperature=-2.0), "temperature"),
    (lambda s, t, y: L.ofa(s, t, y, eps=0.0), "eps must be > 0, got 0.0"),
    (lambda s, t, y: L.bdkd(s, t, balance=0.5), "balance must be >= 1, got 0.5"),
    (lambda s, t, y: L.skd_instance(s, t, temperature=0.0), "temperature"),
    (lambda s, t, y: L.skd_direction(s, t, tikhonov=0.0), "tikhonov must be > 0, got 0.0"),
    (lambda s, t, y: L.skd_direction(s, t, mode="both"), "mode must be 'paper' or 'code'"),
    (lambda s, t, y: L.soft_teacher_cls(s, t, y, background_class=C), "background_class"),
    (lambda s, t, y: L.kd(s, t[:, :-1]), "shapes differ"),
    (lambda s, t, y: L.meal_v2(s, t[None, :, :-1]), "teacher_logits must be"),
])
def test_invalid_arguments_raise(call, message):
  x = _inputs()
  with pytest.raises(ValueError, match=message):
    call(x["student_logits"], x["teacher_logits"], x["labels"])


def test_nd_checks_class_means_shape():
  x = _inputs()
  with pytest.raises(ValueError, match="class_means must be"):
    L.nd(x["student_features"], x["teacher_features"], x["labels"], jnp.zeros((C, D + 1)))


# --- parity with the reference implementations (fixture) ---

def _fixture():
  data = np.load(FIXTURE, allow_pickle=False)
  f32 = lambda k: jnp.asarray(data[k], jnp.float32)
  return data, f32


PARITY = {
    # ref key: (kd_jax function, inputs from the fixture, hyperparameters)
    "kd_T1": (L.kd, ("student", "teacher"), dict(temperature=1.0)),
    "kd_T4": (L.kd, ("student", "teacher"), dict(temperature=4.0)),
    "logit_std_kd_T1": (L.logit_standardized_kd, ("student", "teacher"), dict(temperature=1.0)),
    "logit_std_kd_T2": (L.logit_standardized_kd, ("student", "teacher"), dict(temperature=2.0)),
    "dist_default": (L.dist, ("student", "teacher"), {}),
    "dist_b0.5_g2_tau4": (L.dist, ("student", "teacher"),
                          dict(beta=0.5, gamma=2.0, temperature=4.0)),
    "reverse_kl_T1": (L.reverse_kl, ("student", "teacher"), {}),
    "jensen_shannon_T1": (L.jensen_shannon, ("student", "teacher"), {}),
    "logit_mse": (L.logit_mse, ("student", "teacher"), {}),
    "dkd_a1_b8_T4": (L.dkd, ("student", "teacher", "labels"),
                     dict(alpha=1.0, beta=8.0, temperature=4.0)),
    "dkd_a0.5_b2_T1": (L.dkd, ("student", "teacher", "labels"),
                       dict(alpha=0.5, beta=2.0, temperature=1.0)),
    "nkd_T1_g1.5": (L.nkd, ("student", "teacher", "labels"), {}),
    "nkd_T4_g1": (L.nkd, ("student", "teacher", "labels"), dict(temperature=4.0, gamma=1.0)),
    "uskd_default": (L.uskd, ("student", "weak", "labels"), {}),
    "ofa_eps1_T1": (L.ofa, ("student", "teacher", "labels"), {}),
    "ofa_eps1.5_T2": (L.ofa, ("student", "teacher", "labels"), dict(eps=1.5, temperature=2.0)),
    "nd": (L.nd, ("student_features", "teacher_features", "labels", "class_means"), {}),
    "meal_v2": (L.meal_v2, ("student", "teachers"), {}),
    "soft_teacher_cls": (L.soft_teacher_cls, ("student", "teacher", "soft_teacher_labels"), {}),
    "skd_instance_code": (L.skd_instance, ("student", "teacher"), dict(mode="code")),
    "skd_direction_paper": (L.skd_direction, ("student", "teacher"), {}),
    "skd_direction_code": (L.skd_direction, ("student", "teacher"), dict(mode="code")),
}


@pytest.mark.parametrize("ref_key", sorted(PARITY))
def test_matches_reference_values(ref_key):
  data, f32 = _fixture()
  fn, names, hparams = PARITY[ref_key]
  args = [jnp.asarray(data[n]) if "labels" in n else f32(n) for n in names]
  value = jnp.mean(fn(*args, **hparams))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, data[f"ref/{ref_key}"], rtol=0, atol=1e-5)


def test_meal_v2_discriminator_matches_reference_value():
  data, f32 = _fixture()
  disc = MealV2Discriminator(reduction=int(data["disc_reduction"]))
  params = {"params": {f"Dense_{i}": {"kernel": f32(f"meal_disc_kernel{i}"),
                                      "bias": f32(f"meal_disc_bias{i}")} for i in range(3)}}
  scores = disc.apply(params, f32("disc_student")), disc.apply(params, f32("disc_teacher"))
  value = jnp.mean(meal_v2_discriminator_loss(*scores))
  np.testing.assert_allclose(value, data["ref/meal_v2_discriminator"], rtol=0, atol=1e-5)


def test_fixture_is_small():
  assert os.path.getsize(FIXTURE) < 200_000
