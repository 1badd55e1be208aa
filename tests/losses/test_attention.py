"""MiniLM attention and relation KL: definitions, masks equal slicing, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax.losses import attention as A


def normal(seed, shape):
  # numpy draws: a jax.random draw compiles a new program for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def numpy_row_kl(student_scores, teacher_scores):
  """Direct definition: mean over heads of KL(softmax(t) || softmax(s)) per query row."""
  s, t = np.asarray(student_scores, np.float64), np.asarray(teacher_scores, np.float64)
  log_s = s - np.log(np.exp(s).sum(-1, keepdims=True))
  log_t = t - np.log(np.exp(t).sum(-1, keepdims=True))
  return (np.exp(log_t) * (log_t - log_s)).sum(-1).mean(1)


def test_attention_kl_matches_definition_and_is_zero_on_itself():
  s, t = normal(0, (2, 3, 4, 4)), normal(1, (2, 3, 4, 4))
  close(A.attention_kl(s, t), numpy_row_kl(s, t))
  close(A.attention_kl(s, t, per_example=True), numpy_row_kl(s, t).mean(1))
  close(A.attention_kl(t, t), np.zeros((2, 4)))
  # Probabilities given as log-probs, and per-row shifts of the scores, change nothing.
  close(A.attention_kl(jax.nn.log_softmax(s), t), A.attention_kl(s, t))
  close(A.attention_kl(s + normal(2, (2, 3, 4, 1)), t), A.attention_kl(s, t))


def test_value_relation_matches_definition_with_different_widths():
  vs, vt = normal(3, (2, 2, 5, 4)), normal(4, (2, 2, 5, 6))
  rel = lambda v: np.einsum("bhid,bhjd->bhij", v, v) / np.sqrt(v.shape[-1])
  close(A.value_relation_kl(vs, vt), numpy_row_kl(rel(vs), rel(vt)))
  close(A.value_relation_kl(vt, vt), np.zeros((2, 5)))


def test_self_relation_splits_heads_like_value_relation():
  qs, qt = normal(5, (2, 5, 8)), normal(6, (2, 5, 12))
  split = lambda q, h: q.reshape(2, 5, h, -1).transpose(0, 2, 1, 3)
  close(A.self_relation_kl(qs, qt, num_relation_heads=4),
        A.value_relation_kl(split(qs, 4), split(qt, 4)))


@pytest.mark.parametrize("per_example", [False, True])
def test_mask_equals_slicing(per_example):
  s, t = normal(7, (2, 2, 5, 5)), normal(8, (2, 2, 5, 5))
  vs, vt = normal(9, (2, 2, 5, 3)), normal(10, (2, 2, 5, 4))
  lengths = (3, 5)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  masked = A.minilm(s, t, vs, vt, mask=mask, per_example=per_example)
  for b, n in enumerate(lengths):
    sliced = A.minilm(s[b:b + 1, :, :n, :n], t[b:b + 1, :, :n, :n], vs[b:b + 1, :, :n],
                      vt[b:b + 1, :, :n], per_example=per_example)[0]
    if per_example:
      close(masked[b], sliced)
    else:
      close(masked[b, :n], sliced)
      close(masked[b, n:], np.zeros(5 - n), tol=0)


def test_gradients_teacher_stop_and_dtypes():
  s, t = normal(11, (1, 2, 3, 3)), normal(12, (1, 2, 3, 3))
  vs, vt = normal(13, (1, 2, 3, 4)), normal(14, (1, 2, 3, 4))
  mask = jnp.array([[1, 1, 0]])
  check_grads(jax.jit(lambda a: jnp.sum(A.attention_kl(a, t, mask=mask))), (s,), order=1,
              modes=["rev"], atol=2e-2, rtol=2e-2, eps=3e-3)
  check_grads(jax.jit(lambda a: jnp.sum(A.value_relation_kl(a, vt, mask=mask))),
              (vs,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=3e-3)
  teacher_grads = jax.grad(lambda b, w: jnp.sum(A.minilm(s, b, vs, w, mask=mask)),
                           argnums=(0, 1))(t, vt)
  assert not any(np.any(np.asarray(g)) for g in teacher_grads)
  low = jax.jit(A.minilm)(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), vs.astype(jnp.bfloat16),
                          vt.astype(jnp.bfloat16), mask=mask)
  assert low.dtype == jnp.float32
  close(low, A.minilm(s, t, vs, vt, mask=mask), tol=5e-2)


@pytest.mark.parametrize("call, match", [
    (lambda x: A.attention_kl(x, x[:, :1]), "same"),
    (lambda x: A.attention_kl(x, x, mask=jnp.ones((2, 4))), r"mask must have shape \(2, 3\)"),
    (lambda x: A.value_relation_kl(x[0], x[0]), r"\[B, heads, T, d\]"),
    (lambda x: A.self_relation_kl(x[:, 0], x[:, 0], num_relation_heads=2), "not divisible"),
    (lambda x: A.self_relation_kl(x[:, 0], x[:, 0], num_relation_heads=0), "positive int"),
])
def test_invalid_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((2, 2, 3, 3)))
