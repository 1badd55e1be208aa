"""The embedded digits TFDS builder: split sizes, content, determinism, no TensorFlow."""
import sys

import numpy as np
from sklearn.datasets import load_digits

from kd_jax import data
from kd_jax.data import digits


def test_split_indices_partition_all_digits_and_are_pinned():
  splits = digits.split_indices()
  assert len(splits["train"]) == 1300 and len(splits["test"]) == 497
  np.testing.assert_array_equal(np.sort(np.concatenate([splits["train"], splits["test"]])), np.arange(1797))
  # numpy freezes RandomState's stream, so the split never changes; these pin it.
  np.testing.assert_array_equal(splits["train"][:3], [1081, 1707, 927])


def test_builder_counts_dtypes_and_content(digits_dir):
  builder = digits.Digits(data_dir=digits_dir)
  assert builder.is_prepared() and builder.info.file_format.value == "array_record"
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 1300, "test": 497}
  raw = load_digits()
  for split, indices in digits.split_indices().items():
    images, labels = data.load_arrays("digits", split, digits_dir)
    assert images.shape == (len(indices), 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (len(indices),) and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], np.round(raw.images[indices] * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, raw.target[indices])
  assert images.max() == 255 and images.min() == 0


def test_rebuild_in_fresh_dir_is_identical(digits_dir, tmp_path):
  a = data.load_arrays("digits", "test", digits_dir)
  b = data.load_arrays("digits", "test", tmp_path)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_tensorflow_is_never_imported(digits_dir):
  source = data.open_source("digits", "train", digits_dir)
  next(data.train_batches(source, batch_size=8, seed=0))
  assert "tensorflow" not in sys.modules


def test_dataset_info_stats_come_from_train(digits_dir):
  info = data.dataset_info("digits", digits_dir)
  images, _ = data.load_arrays("digits", "train", digits_dir)
  assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
  np.testing.assert_allclose(info.mean, [images.mean() / 255], rtol=1e-6)
  np.testing.assert_allclose(info.std, [(images / 255).std()], rtol=1e-6)
  assert info.num_examples("train") == 1300 and info.num_examples("test") == 497
  assert info.num_examples("train[:1100]") == 1100 and info.num_examples("train[1100:]") == 200
