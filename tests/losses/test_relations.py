"""Relational losses (SP, PKT, RKD, CC, CRD): parity, invariances, masks, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.losses import modules as M
from kd_jax.losses import relations as R
from kd_jax.losses.features import l2_normalize

from reference_fixtures import assert_close, normal, ref


SCALAR = {
    # torchdistill's SPKDLoss normalises Gram rows by their L1 norm: p=1.
    "sp": lambda s, t, mask=None: R.similarity_preserving(s, t, mask=mask, p=1),
    "sp_p2": R.similarity_preserving,  # the default: the paper and RepDistiller
    "pkt": R.pkt,
    "rkd": R.rkd,
    "rkd_distance": R.rkd_distance,
    "rkd_angle": R.rkd_angle,
    "cc_gaussian": R.correlation_congruence,
    "cc_bilinear": lambda s, t, mask=None: R.correlation_congruence(s, t, mask=mask,
                                                                    kernel="bilinear"),
}
TORCHDISTILL = sorted(set(SCALAR) - {"sp_p2"})


@pytest.mark.parametrize("name", TORCHDISTILL)
def test_matches_torchdistill(name):
  value = SCALAR[name](ref(f"{name}/student"), ref(f"{name}/teacher"))
  assert value.shape == ()
  assert_close(value, ref(f"{name}/value"))


def test_sp_default_is_the_paper_and_repdistiller_l2_form():
  # RepDistiller Similarity: G = f fᵀ, G / ‖G row‖₂, ‖G_t − G_s‖²_F / B².
  s, t = np.asarray(ref("sp/student"), np.float64), np.asarray(ref("sp/teacher"), np.float64)

  def gram(f):
    f = f.reshape(len(f), -1)
    g = f @ f.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

  expected = np.sum((gram(t) - gram(s)) ** 2) / len(s) ** 2
  assert_close(R.similarity_preserving(ref("sp/student"), ref("sp/teacher")), expected)
  assert losses.get_loss("sp").hparams["p"] == 2


@pytest.mark.parametrize("name", sorted(SCALAR))
def test_mask_equals_slicing(name):
  s, t = normal(0, (6, 2, 2, 3)), normal(1, (6, 5))
  mask = jnp.array([1, 0, 1, 1, 0, 1])
  keep = np.flatnonzero(mask)
  garbage_s = s.at[1].set(1e3).at[4].set(-7.0)
  garbage_t = t.at[1].set(jnp.nan).at[4].set(1e4)
  assert_close(SCALAR[name](garbage_s, garbage_t, mask=mask), SCALAR[name](s[keep], t[keep]),
               tol=1e-5)
  assert_close(SCALAR[name](s, t, mask=jnp.ones(6)), SCALAR[name](s, t), tol=1e-6)


@pytest.mark.parametrize("name", sorted(SCALAR))
def test_gradients_teacher_stop_and_dtypes(name):
  fn = jax.jit(SCALAR[name])
  s, t = normal(2, (5, 4)), normal(3, (5, 6))
  check_grads(jax.jit(lambda a: fn(a, t)),
              (s,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=3e-3)
  assert not np.any(np.asarray(jax.jit(jax.grad(lambda b: fn(s, b)))(t)))
  low, full = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)), fn(s, t)
  assert low.dtype == jnp.float32
  assert_close(low, full, tol=0.05 * abs(float(full)) + 1e-3)


def test_identities_and_invariances():
  x = normal(4, (5, 6))
  rotation, _ = jnp.linalg.qr(normal(5, (6, 6)))
  assert abs(float(R.similarity_preserving(x, 3.0 * x))) < 1e-6
  assert abs(float(R.similarity_preserving(x, 3.0 * x, p=2))) < 1e-6
  assert abs(float(R.pkt(x, x))) < 1e-6
  assert abs(float(R.correlation_congruence(x, x))) < 1e-6
  # RKD distances are normalised by their mean: translation and scale drop out; angles
  # are also invariant to rotation.
  assert abs(float(R.rkd_distance(2.5 * x + 1.0, x))) < 1e-6
  assert abs(float(R.rkd_angle(0.3 * x @ rotation - 2.0, x))) < 1e-6
  assert abs(float(R.rkd(0.5 * x + 3.0, x))) < 1e-6
  assert float(R.rkd(x, normal(6, (5, 6)))) > 0


@pytest.mark.parametrize("call, match", [
    (lambda x, m: R.pkt(x, x, eps=0.0), "eps must be > 0"),
    (lambda x, m: R.similarity_preserving(x, x, p=3), "p must be 1 or 2"),
    (lambda x, m: R.rkd(x, x, angle_weight=-1.0), "angle_weight"),
    (lambda x, m: R.correlation_congruence(x, x, kernel="poly"), "kernel"),
    (lambda x, m: R.correlation_congruence(x, x, gamma=0.0), "gamma"),
    (lambda x, m: R.similarity_preserving(x, x, mask=jnp.ones(3)), r"mask must have shape \(4,\)"),
    (lambda x, m: R.crd(x, x, m, jnp.arange(4), jnp.zeros((4, 3), int), temperature=0.0),
     "temperature must be > 0"),
    (lambda x, m: R.crd(x, x, m, jnp.arange(4), jnp.zeros((4, 3), int), momentum=1.0),
     "momentum"),
    (lambda x, m: R.crd(x[:, :2], x[:, :2], m, jnp.arange(4), jnp.zeros((4, 3), int)),
     "embeddings must be"),
])
def test_invalid_arguments_raise(call, match):
  memory = M.init_crd_memory(jax.random.key(0), 10, 3)
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((4, 3)), memory)


# --- CRD.

def _fixture_memory():
  return M.CRDMemory(student=ref("crd/memory_student"), teacher=ref("crd/memory_teacher"),
                     z_student=jnp.float32(-1), z_teacher=jnp.float32(-1))


def test_crd_matches_torchdistill_over_two_steps():
  memory = _fixture_memory()
  step = jax.jit(R.crd)
  for i in range(2):
    p = f"crd/step{i}/"
    loss, memory = step(ref(p + "student"), ref(p + "teacher"), memory,
                        ref(p + "indices").astype(jnp.int32),
                        ref(p + "contrast_indices").astype(jnp.int32))
    assert loss.shape == (6,)
    value = ref(p + "value").reshape(())  # torchdistill returns shape [1]
    assert_close(loss.mean(), value, tol=1e-5 * float(value))
    assert_close(memory.student, ref(p + "memory_student"))
    assert_close(memory.teacher, ref(p + "memory_teacher"))
    assert_close(memory.z_student, ref(p + "z_student"), tol=1e-5 * float(ref(p + "z_student")))
    assert_close(memory.z_teacher, ref(p + "z_teacher"), tol=1e-5 * float(ref(p + "z_teacher")))


def _crd_batch(seed, batch=5, dim=4, num_data=12, negatives=6):
  s = l2_normalize(normal(seed, (batch, dim)))
  t = l2_normalize(normal(seed + 50, (batch, dim)))
  indices = jnp.asarray(np.random.default_rng(seed).permutation(num_data)[:batch], jnp.int32)
  contrast = M.crd_contrast_indices(jax.random.key(seed), indices, negatives, num_data)
  return s, t, indices, contrast, M.init_crd_memory(jax.random.key(seed + 100), num_data, dim)


def test_crd_memory_update_behaviour():
  s, t, indices, contrast, memory = _crd_batch(0)
  loss, new = R.crd(s, t, memory, indices, contrast, momentum=0.5)
  others = np.setdiff1d(np.arange(12), np.asarray(indices))
  assert_close(new.student[others], memory.student[others], tol=0)
  assert_close(new.teacher[others], memory.teacher[others], tol=0)
  expected = 0.5 * memory.student[indices] + 0.5 * s
  assert_close(new.student[indices], expected / jnp.linalg.norm(expected, axis=1, keepdims=True))
  assert_close(jnp.linalg.norm(new.teacher[indices], axis=1), jnp.ones(5))
  assert float(new.z_student) > 0 and float(new.z_teacher) > 0
  # Z is fixed after the first batch.
  _, newer = R.crd(t, s, new, indices, contrast)
  assert float(newer.z_student) == float(new.z_student)
  assert np.all(np.isfinite(loss)) and np.all(np.asarray(loss) > 0)


def test_crd_mask_equals_slicing_and_padded_rows_do_not_update():
  s, t, indices, contrast, memory = _crd_batch(1)
  mask = jnp.array([1, 0, 1, 1, 0])
  keep = np.flatnonzero(mask)
  loss, new = R.crd(s, t, memory, indices, contrast, mask=mask)
  sliced_loss, sliced = R.crd(s[keep], t[keep], memory, indices[keep], contrast[keep])
  assert_close(loss[keep], sliced_loss)
  assert_close(loss[np.array([1, 4])], jnp.zeros(2), tol=0)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(sliced)):
    assert_close(a, b)


def test_crd_gradients_reach_both_embeddings_not_memory():
  s, t, indices, contrast, memory = _crd_batch(2)

  def total(s, t, memory):
    return jnp.mean(R.crd(s, t, memory, indices, contrast)[0])

  gs, gt, gm = jax.grad(total, argnums=(0, 1, 2))(s, t, memory)
  # Z is a constant once set (as in torchdistill's `.item()`); compare to finite
  # differences only then, since the first batch's Z moves with the inputs.
  _, memory = R.crd(s, t, memory, indices, contrast)
  assert np.any(np.asarray(gs)) and np.any(np.asarray(gt))
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(gm))
  check_grads(jax.jit(lambda a: total(a, t, memory)),
              (s,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)


def test_crd_embed_outputs_unit_vectors():
  out, _ = jax.jit(M.CRDEmbed(features=4).init_with_output)(jax.random.key(0),
                                                           normal(0, (3, 2, 2, 5)))
  assert_close(jnp.linalg.norm(out, axis=1), jnp.ones(3))
