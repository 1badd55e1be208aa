"""Example subsets: stratified fractions, a class left out, in-memory and indexed sources."""
import numpy as np
import pytest

from kd_jax import data

LABELS = np.repeat(np.arange(4), [10, 20, 30, 40])


def test_stratified_fraction_keeps_each_class_share_and_is_seeded():
  picked = data.stratified_fraction(LABELS, 0.25, seed=1)
  assert np.bincount(LABELS[picked]).tolist() == [2, 5, 8, 10]  # round(0.25 · n), n = 10..40
  assert np.all(np.diff(picked) > 0)
  assert np.array_equal(picked, data.stratified_fraction(LABELS, 0.25, seed=1))
  assert not np.array_equal(picked, data.stratified_fraction(LABELS, 0.25, seed=2))
  assert np.bincount(LABELS[data.stratified_fraction(LABELS, 0.01, seed=0)]).tolist() == [1] * 4
  assert np.array_equal(data.stratified_fraction(LABELS, 1.0, seed=0), np.arange(100))


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_fraction_outside_unit_interval_is_rejected(fraction):
  with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
    data.stratified_fraction(LABELS, fraction, seed=0)


def test_without_class_drops_exactly_that_class():
  kept = data.without_class(LABELS, 2)
  assert 2 not in LABELS[kept] and len(kept) == 70
  with pytest.raises(ValueError, match="class 4 is not among the labels 0..3"):
    data.without_class(LABELS, 4)


def test_subset_of_arrays_and_of_any_source_agree():
  images = np.arange(100 * 4, dtype=np.uint8).reshape(100, 2, 2, 1)
  arrays = data.ArrayDataSource(images, LABELS.astype(np.int32))
  indices = [3, 50, 99]
  in_memory = data.subset(arrays, indices)
  indexed = data.IndexedSource(arrays, indices)
  assert isinstance(in_memory, data.ArrayDataSource) and len(indexed) == 3
  for a, b in zip(data.gather(in_memory, range(3)), data.gather(indexed, range(3))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(data.class_ids(indexed), LABELS[indices])
