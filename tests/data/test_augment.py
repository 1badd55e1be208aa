"""Augmentations: shapes, crop-with-padding as a pure shift, flips, normalisation."""
import numpy as np
import pytest

from kd_jax import data


def reference_shift(image, dy, dx):
  """`out[i, j] = image[i + dy, j + dx]`, zero outside, written out by loops."""
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  for i in range(h):
    for j in range(w):
      if 0 <= i + dy < h and 0 <= j + dx < w:
        out[i, j] = image[i + dy, j + dx]
  return out


def test_crop_with_padding_only_shifts():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 8, 8, 3), dtype=np.uint8)
  config = data.AugmentConfig(crop_padding=2)
  draws = data.sample_augment(config, 64, rng)
  out = data.apply_augment(images, draws, config)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert np.all(np.abs(draws["shifts"]) <= 2)
  assert len({tuple(s) for s in draws["shifts"]}) > 1
  for image, result, (dy, dx) in zip(images, out, draws["shifts"]):
    np.testing.assert_array_equal(result, reference_shift(image, dy, dx))


def test_flip_mirrors_exactly_the_drawn_images():
  rng = np.random.default_rng(1)
  images = rng.random((32, 5, 6, 1)).astype(np.float32)
  config = data.AugmentConfig(flip=True)
  draws = data.sample_augment(config, 32, rng)
  out = data.apply_augment(images, draws, config)
  assert 0 < draws["flips"].sum() < 32
  np.testing.assert_array_equal(out[draws["flips"]], images[draws["flips"]][:, :, ::-1])
  np.testing.assert_array_equal(out[~draws["flips"]], images[~draws["flips"]])


def test_no_augmentation_is_identity():
  images = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
  config = data.AugmentConfig()
  np.testing.assert_array_equal(data.apply_augment(images, data.sample_augment(config, 2, None), config), images)


def test_normalize_scales_uint8_and_keeps_float():
  images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(data.normalize(images).ravel(), [0, 0.2, 1], rtol=1e-6)
  np.testing.assert_allclose(data.normalize(images, 0.2, 0.5).ravel(), [-0.4, 0, 1.6], rtol=1e-6, atol=1e-7)
  rgb = np.ones((1, 1, 1, 3), np.float32)
  np.testing.assert_allclose(data.normalize(rgb, (0, 0.5, 1), (1, 0.5, 2)).ravel(), [1, 1, 0])


@pytest.mark.parametrize("mean, std, match", [(0.5, None, "both mean and std"), ((0.1, 0.2), 1.0, "per channel")])
def test_normalize_rejects_bad_statistics(mean, std, match):
  with pytest.raises(ValueError, match=match):
    data.normalize(np.zeros((1, 2, 2, 3), np.uint8), mean, std)


def test_negative_padding_is_rejected():
  with pytest.raises(ValueError, match="crop_padding"):
    data.AugmentConfig(crop_padding=-1)
