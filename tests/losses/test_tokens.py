"""Tests for kd_jax.losses.tokens: the generalized JSD against TRL's formula, chunked = unchunked
(values and gradients), padded tokens under `masked_mean`, and top-k KD's bounds."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.losses import tokens as K
from kd_jax.losses.logits import jensen_shannon, kd, reverse_kl
from kd_jax.losses.utils import masked_mean

B, T, V = 2, 5, 11
# N and V are not multiples of the chunks: the last token chunk is padded, the last vocabulary
# chunk overlaps the one before it.
N, VOCAB, D_S, D_T = 37, 53, 8, 6
CHUNKS = {"token_chunk": 16, "vocab_chunk": 10}
MASK = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def _logits(seed=0, shape=(B, T, V)):
  return 2.0 * _normal(seed, shape), 2.0 * _normal(seed + 1, shape)


@pytest.mark.parametrize("beta, reference", [(0.0, kd), (1.0, reverse_kl), (0.5, jensen_shannon)])
def test_generalized_jsd_special_cases(beta, reference):
  s, t = _logits()
  np.testing.assert_allclose(K.generalized_jsd(s, t, beta=beta, temperature=2.0),
                             reference(s, t, temperature=2.0) / 4.0, rtol=1e-5, atol=1e-6)


def test_generalized_jsd_is_zero_for_identical_logits():
  s, _ = _logits()
  for beta in (0.0, 0.3, 1.0):
    np.testing.assert_allclose(K.generalized_jsd(s, s, beta=beta), 0.0, atol=1e-6)


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
  """TRL's `GKDTrainer.generalized_jsd_loss` steps in float64 numpy, summed over the vocabulary
  (its "batchmean" averages these per-token sums over the unmasked tokens)."""
  def log_softmax(x):
    x = x / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), -1, keepdims=True))

  log_s = log_softmax(np.asarray(student_logits, np.float64))
  log_t = log_softmax(np.asarray(teacher_logits, np.float64))
  mixture = np.logaddexp(log_s + np.log(1 - beta), log_t + np.log(beta))
  kl_teacher = np.exp(log_t) * (log_t - mixture)  # F.kl_div(mixture, teacher, log_target=True)
  kl_student = np.exp(log_s) * (log_s - mixture)
  return np.sum(beta * kl_teacher + (1 - beta) * kl_student, axis=-1)


def test_generalized_jsd_matches_trl_formula():
  s, t = _logits(seed=3)
  np.testing.assert_allclose(K.generalized_jsd(s, t, beta=0.3, temperature=0.9),
                             _trl_generalized_jsd(s, t, 0.3, 0.9), rtol=1e-6, atol=1e-6)
  traced = jax.jit(lambda b: K.generalized_jsd(s, t, beta=b, temperature=0.9))(0.3)
  np.testing.assert_allclose(traced, _trl_generalized_jsd(s, t, 0.3, 0.9), rtol=1e-6, atol=1e-6)


def test_generalized_jsd_is_registered():
  spec = losses.get_loss("generalized_jsd")
  assert spec.fn is losses.generalized_jsd and spec.per_example
  assert spec.inputs == ("student_logits", "teacher_logits")
  assert spec.hparams == {"beta": 0.5, "temperature": 1.0}


@pytest.mark.parametrize("call, message", [
    (lambda s, t: K.generalized_jsd(s, t, beta=1.5), "generalized_jsd: beta must be in"),
    (lambda s, t: K.generalized_jsd(s, t, temperature=0.0), "generalized_jsd: temperature"),
    (lambda s, t: K.token_divergence(s, t, divergence="kl"),
     "token_divergence: divergence must be 'forward_kl' or 'reverse_kl' or 'js' or 'gjsd'"),
    (lambda s, t: K.topk_kd(s, *K.teacher_topk(t, 3), tail="drop"),
     "topk_kd: tail must be 'bin' or 'renormalize', got 'drop'"),
    (lambda s, t: K.teacher_topk(t, 0), r"teacher_topk: k must be in \[1, 11\], got 0"),
])
def test_bad_hyperparameters_name_the_loss_and_the_field(call, message):
  s, t = _logits()
  with pytest.raises(ValueError, match=message):
    call(s, t)


def _heads(dtype=jnp.float32):
  """LM-head inputs: hidden states [N, D], kernels [D, V] and biases [V], logits of std ≈ 2."""
  return tuple(x.astype(dtype) for x in (
      _normal(10, (N, D_S)), _normal(11, (D_S, VOCAB), 2.0 / D_S**0.5), _normal(12, (VOCAB,)),
      _normal(13, (N, D_T)), _normal(14, (D_T, VOCAB), 2.0 / D_T**0.5), _normal(15, (VOCAB,))))


def _unchunked(hs, ws, bs, ht, wt, bt, **hparams):
  return K.token_divergence(hs @ ws + bs, ht @ wt + bt, **hparams)


def _values_and_grads(fn, args, cotangent):
  """Per-token values and the gradient of ⟨cotangent, values⟩ w.r.t. every argument."""
  values, vjp = jax.vjp(fn, *args)
  return values, vjp(cotangent)


@pytest.mark.parametrize("divergence", K.DIVERGENCES)
def test_chunked_equals_unchunked_values_and_gradients(divergence):
  hparams = {"divergence": divergence, "temperature": 0.9, "beta": 0.3}
  args, cotangent = _heads(), _normal(16, (N,))
  chunked = jax.jit(lambda *a: _values_and_grads(
      lambda *x: K.chunked_token_divergence(*x, **hparams, **CHUNKS), a, cotangent))
  values, grads = chunked(*args)
  ref_values, ref_grads = jax.jit(lambda *a: _values_and_grads(
      lambda *x: _unchunked(*x, **hparams), a, cotangent))(*args)
  assert values.shape == (N,) and values.dtype == jnp.float32
  np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5)
  for name, g, ref in zip(("student_hidden", "student_kernel", "student_bias"), grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=name)
  for g in grads[3:]:  # the teacher's hidden states, kernel and bias
    np.testing.assert_array_equal(g, 0.0)


def test_chunked_takes_bfloat16_inputs_and_computes_in_float32():
  args16 = _heads(jnp.bfloat16)
  out = jax.jit(functools.partial(K.chunked_token_divergence, **CHUNKS))(*args16)
  expected = jax.jit(_unchunked)(*(a.astype(jnp.float32) for a in args16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_chunked_checks_shapes():
  hs, ws, bs, ht, wt, bt = _heads()
  with pytest.raises(ValueError, match="chunked_token_divergence: expected student_hidden"):
    K.chunked_token_divergence(hs, ws[:, :-1], None, ht, wt, None)


@pytest.mark.parametrize("divergence", K.DIVERGENCES)
def test_padded_tokens_change_nothing_under_masked_mean(divergence):
  s, t = _logits(seed=5)
  pad = (MASK == 0)[..., None]
  huge = jnp.where(jnp.arange(V) % 2 == 0, 1e4, -1e4)  # probabilities exactly 0 and 1
  s_pad, t_pad = jnp.where(pad, huge, s), jnp.where(pad, -huge, t)
  loss = jax.jit(jax.value_and_grad(lambda s, t: masked_mean(
      K.token_divergence(s, t, divergence=divergence, temperature=0.9, beta=0.3), MASK)))
  (value, grad), (value_pad, grad_pad) = loss(s, t), loss(s_pad, t_pad)
  np.testing.assert_allclose(value_pad, value, rtol=1e-6)
  np.testing.assert_allclose(grad_pad, grad, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(jnp.where(pad, grad_pad, 0.0), 0.0)
  np.testing.assert_array_equal(jnp.where(pad, grad, 0.0), 0.0)


def test_masked_mean_ignores_non_finite_values_at_padding():
  values = jnp.array([[1.0, 2.0, jnp.inf], [3.0, jnp.nan, -jnp.inf]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  value, grad = jax.value_and_grad(masked_mean)(values, mask)
  assert float(value) == 2.0
  np.testing.assert_array_equal(grad, jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]) / 3)


def test_chunked_padded_tokens_get_no_gradient():
  hs, ws, bs, ht, wt, bt = _heads()
  mask = jnp.arange(N) < 30
  hs_pad = jnp.where(mask[:, None], hs, 1e4)
  loss = jax.jit(jax.value_and_grad(lambda hs, ws: masked_mean(
      K.chunked_token_divergence(hs, ws, bs, ht, wt, bt, **CHUNKS), mask), argnums=(0, 1)))
  (value, (g_h, g_w)), (value_pad, (g_h_pad, g_w_pad)) = loss(hs, ws), loss(hs_pad, ws)
  np.testing.assert_allclose(value_pad, value, rtol=1e-6)
  np.testing.assert_array_equal(g_h_pad[30:], 0.0)
  np.testing.assert_allclose(g_h_pad[:30], g_h[:30], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g_w_pad, g_w, rtol=1e-6, atol=1e-9)


def test_teacher_topk_stores_the_top_logits_and_the_full_logsumexp():
  _, t = _logits()
  values, indices, lse = K.teacher_topk(t, 4, temperature=2.0)
  assert values.shape == indices.shape == (B, T, 4) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(values, jnp.take_along_axis(t, indices, axis=-1))
  np.testing.assert_array_equal(values, -jnp.sort(-t, axis=-1)[..., :4])
  np.testing.assert_allclose(lse, jax.nn.logsumexp(t / 2.0, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("tail", K.TAILS)
def test_topk_kd_at_k_equal_v_is_full_kd(tail):
  s, t = _logits(seed=7)
  topk = K.teacher_topk(t, V, temperature=2.0)
  np.testing.assert_allclose(K.topk_kd(s, *topk, temperature=2.0, tail=tail),
                             kd(s, t, temperature=2.0), rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=2)
def _topk_kd_bin(s, t, k):
  return K.topk_kd(s, *K.teacher_topk(t, k, temperature=1.5), temperature=1.5)


def test_topk_kd_bin_is_a_lower_bound_that_tightens_with_k():
  vocab = 6  # every k from 1 to V: one compile each
  s, t = _logits(seed=8, shape=(B, T, vocab))
  full = kd(s, t, temperature=1.5)
  gaps = np.stack([full - _topk_kd_bin(s, t, k) for k in range(1, vocab + 1)])
  assert np.all(gaps >= -1e-5), gaps.min()
  assert np.all(np.diff(gaps, axis=0) <= 1e-5), np.diff(gaps, axis=0).max()
  assert np.all(gaps[0] > 1e-3)  # k = 1 does lose information here
  np.testing.assert_allclose(gaps[-1], 0.0, atol=1e-5)


def test_topk_kd_renormalize_is_non_negative():
  s, t = _logits(seed=9)
  for k in (1, 4):
    out = K.topk_kd(s, *K.teacher_topk(t, k), tail="renormalize")
    assert np.all(out >= 0.0)


@pytest.mark.parametrize("tail", K.TAILS)
def test_topk_kd_gradients_match_finite_differences(tail):
  with jax.enable_x64(True):
    s, t = (x.astype(jnp.float64) for x in _logits(seed=10, shape=(3, 6)))
    topk = K.teacher_topk(t, 3, temperature=1.5)
    check_grads(jax.jit(lambda s: K.topk_kd(s, *topk, temperature=1.5, tail=tail)), (s,),
                order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_topk_kd_teacher_gets_no_gradient():
  s, t = _logits(seed=11)
  values, indices, lse = K.teacher_topk(t, 4)
  grads = jax.grad(lambda v, l: jnp.sum(K.topk_kd(s, v, indices, l)), argnums=(0, 1))(values, lse)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)
