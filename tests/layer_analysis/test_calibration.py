"""Reliability bins and ECE: a hand-computed case, the bin edges, the bounds."""
import numpy as np
import pytest

from kd_jax.analysis.calibration import reliability


def _logits_with_confidence(confidence):
  """Two-class logits whose top probability is `confidence` (on class 0)."""
  confidence = np.asarray(confidence, np.float64)
  return np.stack([np.log(confidence), np.log(1 - confidence)], -1)


def test_ece_matches_a_hand_computation():
  # Bin (0.6, 0.8] of 5 bins: confidences 0.7, 0.7, 0.75, one right → acc 1/3, conf 0.7167.
  # Bin (0.8, 1.0]: confidences 0.9, 0.95, both right → acc 1, conf 0.925.
  conf = [0.7, 0.7, 0.75, 0.9, 0.95]
  labels = np.array([0, 1, 1, 0, 0])
  r = reliability(_logits_with_confidence(conf), labels, num_bins=5)
  want = 3 / 5 * abs(1 / 3 - np.mean(conf[:3])) + 2 / 5 * abs(1 - np.mean(conf[3:]))
  assert r.ece == pytest.approx(want, abs=1e-12)
  assert list(r.count) == [0, 0, 0, 3, 2]
  assert r.test_accuracy == pytest.approx(3 / 5)


def test_a_confidence_on_a_bin_edge_belongs_to_the_lower_bin():
  r = reliability(_logits_with_confidence([0.8]), np.array([0]), num_bins=5)
  assert list(r.count) == [0, 0, 0, 1, 0]  # (0.6, 0.8], as Guo et al.


def test_ece_is_between_zero_and_one_and_counts_every_example():
  rng = np.random.default_rng(0)
  logits, labels = 3 * rng.standard_normal((200, 10)), rng.integers(0, 10, 200)
  r = reliability(logits, labels)
  assert 0.0 <= r.ece <= 1.0 and r.count.sum() == 200
  wrong = reliability(np.eye(10)[labels] * 50, (labels + 1) % 10)  # sure and always wrong
  assert wrong.ece == pytest.approx(1.0, abs=1e-9)


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="logits \\[N, C\\] and labels \\[N\\]"):
    reliability(np.zeros((3, 2)), np.zeros(4, int))
