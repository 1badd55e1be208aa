"""DSA: deterministic given the key, differentiable, exact identities; ZCA: whitening, round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.data.dsa import DSAParams, diff_augment
from kd_jax.data.zca import fit_zca, zca_apply, zca_inverse

IMAGES = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))


def test_same_key_same_augmentation_for_every_family():
  aug = jax.jit(lambda x, k: diff_augment(x, k, mode="all"))
  key = jax.random.key(7)
  np.testing.assert_array_equal(aug(IMAGES, key), aug(IMAGES, key))
  assert not np.allclose(aug(IMAGES, key), aug(IMAGES, jax.random.key(8)))
  single = jax.jit(lambda x, k: diff_augment(x, k))  # one family drawn from the key
  np.testing.assert_array_equal(single(IMAGES, key), single(IMAGES, key))


def test_siamese_same_params_for_different_images():
  """The same key applies the same transform to any batch: augmenting a sum is the sum of the
  augmentations for the linear families (everything but color's per-image means is linear)."""
  key = jax.random.key(3)
  other = jax.random.normal(jax.random.key(1), IMAGES.shape)
  for family in ("crop", "cutout", "flip", "scale", "rotate"):
    lhs = diff_augment(IMAGES + other, key, strategy=family)
    rhs = diff_augment(IMAGES, key, strategy=family) + diff_augment(other, key, strategy=family)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def test_identity_settings_and_flip():
  key = jax.random.key(0)
  neutral = DSAParams(ratio_scale=1.0, ratio_rotate=0.0, ratio_crop_pad=0.0)
  for family in ("scale", "rotate", "crop"):
    np.testing.assert_allclose(diff_augment(IMAGES, key, strategy=family, params=neutral),
                               IMAGES, atol=1e-5)
  always = diff_augment(IMAGES, key, strategy="flip", params=DSAParams(prob_flip=1.1))
  np.testing.assert_array_equal(always, IMAGES[:, :, ::-1])


def test_cutout_zeroes_a_square_and_grads_flow():
  out = diff_augment(IMAGES, jax.random.key(2), strategy="cutout")
  zeroed = np.all(np.asarray(out) == 0, axis=-1)
  assert 0 < zeroed.sum(axis=(1, 2)).min() and zeroed.sum(axis=(1, 2)).max() <= 16
  grad = jax.grad(lambda x: jnp.sum(diff_augment(x, jax.random.key(4), mode="all") ** 2))(IMAGES)
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_bad_strategy_and_mode_raise():
  with pytest.raises(ValueError, match="blur"):
    diff_augment(IMAGES, jax.random.key(0), strategy="color_blur")
  with pytest.raises(ValueError, match="mode"):
    diff_augment(IMAGES, jax.random.key(0), mode="multi")


def test_zca_whitens_and_round_trips():
  rng = np.random.default_rng(0)
  mixing = rng.standard_normal((12, 12))
  images = (rng.standard_normal((400, 12)) @ mixing + 3.0).reshape(400, 2, 2, 3)
  zca = fit_zca(images, regularization=1e-6)
  white = zca_apply(zca, images).reshape(400, -1)
  np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(12), atol=1e-3)
  np.testing.assert_allclose(zca_inverse(zca, zca_apply(zca, images)), images, atol=1e-3)
  np.testing.assert_allclose(zca.whiten, zca.whiten.T, atol=1e-5)  # ZCA, not PCA: symmetric
  reg = fit_zca(images, regularization=0.1)  # kornia eps: shrinks, still inverts exactly
  np.testing.assert_allclose(zca_inverse(reg, zca_apply(reg, images)), images, atol=1e-3)
  with pytest.raises(ValueError, match="features"):
    zca_apply(zca, np.zeros((2, 3, 3, 3)))
