"""Hinton's omitted-class bias correction: fitting and its effect on recall."""
import numpy as np
import pytest

from kd_jax import class_bias


def _logits(rng, labels, num_classes, handicap):
  """Logits that rank the true class first by a margin, except class 0, whose logit is lowered
  by `handicap` (a student that never saw class 0)."""
  logits = rng.normal(size=(len(labels), num_classes))
  logits[np.arange(len(labels)), labels] += 3.0
  logits[:, 0] -= handicap
  return logits


def test_fitted_bias_undoes_a_uniform_handicap():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 400)
  logits = _logits(rng, labels, 5, handicap=4.0)
  assert class_bias.accuracy(logits, labels, 0) < 0.3
  bias = class_bias.fit_class_bias(logits, labels, 0)
  assert 2.0 <= bias <= 6.0
  corrected = class_bias.with_class_bias(logits, 0, bias)
  assert class_bias.accuracy(corrected, labels, 0) > 0.8
  assert class_bias.accuracy(corrected, labels) >= class_bias.accuracy(logits, labels)


def test_a_larger_bias_never_lowers_that_class_recall():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 200)
  logits = rng.normal(size=(200, 4))
  recalls = [class_bias.accuracy(class_bias.with_class_bias(logits, 2, b), labels, 2)
             for b in np.linspace(0, 10, 21)]
  assert np.all(np.diff(recalls) >= 0)


def test_ties_go_to_the_smallest_bias_and_missing_class_is_an_error():
  logits = np.array([[2.0, 0.0], [0.0, 2.0]])
  assert class_bias.fit_class_bias(logits, np.array([0, 1]), 1) == 0.0
  with pytest.raises(ValueError, match="no example of class 1"):
    class_bias.fit_class_bias(logits, np.array([0, 0]), 1)
