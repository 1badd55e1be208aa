"""CKA: the reference estimators, identities, invariances, masks and gradients."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax.losses import kernel_alignment as C

REF = np.load(Path(__file__).parent / "fixtures" / "features_reference.npz")


def normal(seed, shape):
  # numpy draws: a jax.random draw compiles a new program for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_matches_kornblith_reference(kernel, debiased):
  x, y = jnp.asarray(REF["cka/x"]), jnp.asarray(REF["cka/y"])
  fn = C.linear_cka if kernel == "linear" else lambda a, b, **kw: C.rbf_cka(a, b, threshold=0.5, **kw)
  expected = REF[f"cka/{kernel}_{'debiased' if debiased else 'biased'}"]
  close(fn(x, y, debiased=debiased), expected)
  close(C.cka_loss(x, y, kernel=kernel, threshold=0.5, debiased=debiased), 1 - expected)


def test_linear_cka_equals_feature_space_formula():
  x, y = normal(0, (12, 5)), normal(1, (12, 7))
  xc, yc = x - x.mean(0), y - y.mean(0)
  expected = (jnp.linalg.norm(yc.T @ xc) ** 2 /
              (jnp.linalg.norm(xc.T @ xc) * jnp.linalg.norm(yc.T @ yc)))
  close(C.linear_cka(x, y), expected)


@pytest.mark.parametrize("debiased", [False, True])
def test_identity_and_invariances(debiased):
  x = normal(2, (10, 6))
  y = x @ normal(3, (6, 4)) + 0.3 * normal(4, (10, 4))
  q, _ = jnp.linalg.qr(normal(5, (6, 6)))
  for fn in (C.linear_cka, C.rbf_cka):
    close(fn(x, x, debiased=debiased), 1.0)
    base = fn(x, y, debiased=debiased)
    close(fn(x @ q, y, debiased=debiased), base, tol=1e-4)  # orthogonal transform
    close(fn(3.0 * x, y, debiased=debiased), base, tol=1e-4)  # isotropic scaling
  # Linear CKA also ignores translations of either side.
  close(C.linear_cka(x + 2.0, y, debiased=debiased), C.linear_cka(x, y, debiased=debiased), 1e-4)
  assert 0 < float(C.linear_cka(x, normal(6, (10, 3)))) < 1


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_mask_equals_slicing(kernel, debiased):
  x, y = normal(7, (9, 4)), normal(8, (9, 3))
  mask = jnp.array([1, 1, 0, 1, 1, 0, 1, 1, 0])
  keep = np.flatnonzero(mask)
  padded_x, padded_y = x.at[2].set(1e4), y.at[5].set(jnp.nan)
  close(C.cka_loss(padded_x, padded_y, mask=mask, kernel=kernel, debiased=debiased),
        C.cka_loss(x[keep], y[keep], kernel=kernel, debiased=debiased))


def test_gradients_teacher_stop_jit_and_bf16():
  x, y = normal(9, (8, 4)), normal(10, (8, 5))
  for kwargs in ({}, {"kernel": "rbf"}, {"debiased": True}):
    check_grads(jax.jit(lambda a: C.cka_loss(a, y, **kwargs)),
                (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=3e-3)
    assert not np.any(np.asarray(jax.grad(lambda b: C.cka_loss(x, b, **kwargs))(y)))
  low = jax.jit(C.cka_loss)(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  assert low.dtype == jnp.float32
  close(low, C.cka_loss(x, y), tol=2e-2)


@pytest.mark.parametrize("call, match", [
    (lambda x: C.cka_loss(x, x, kernel="cosine"), "kernel"),
    (lambda x: C.rbf_cka(x, x, threshold=0.0), "threshold"),
    (lambda x: C.linear_cka(x[:3], x[:3], debiased=True), "at least 4"),
    (lambda x: C.linear_cka(x, x[:4]), "differ in size"),
])
def test_invalid_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((5, 3)))
