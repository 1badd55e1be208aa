"""Calibration of a classifier: reliability bins and the expected calibration error (ECE).

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: the
predictions are split into `num_bins` equal-width bins of confidence (the top softmax
probability; bin m holds confidences in ((m − 1)/M, m/M]), and::

  ECE = Σ_m (n_m / N)·|accuracy_m − confidence_m|

is 0 for a calibrated classifier and at most 1.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Reliability:
  """Per-bin `accuracy`, mean `confidence` and `count` `[num_bins]` (0 where a bin is empty),
  the `ece`, and the overall `test_accuracy` and `mean_confidence`."""
  accuracy: np.ndarray
  confidence: np.ndarray
  count: np.ndarray
  ece: float
  test_accuracy: float
  mean_confidence: float


def reliability(logits: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> Reliability:
  """Reliability bins and ECE of `logits` `[N, C]` against class ids `labels` `[N]`.

  >>> r = reliability(np.array([[9.0, 0.0], [0.0, 9.0]]), np.array([0, 1]))
  >>> round(r.ece, 4), int(r.count.sum()), r.test_accuracy
  (0.0001, 2, 1.0)
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"need logits [N, C] and labels [N], got {logits.shape} and {labels.shape}")
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  confidence, correct = probs.max(-1), probs.argmax(-1) == labels
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  safe = np.maximum(count, 1)
  accuracy = np.bincount(bins, correct, num_bins) / safe
  mean_confidence = np.bincount(bins, confidence, num_bins) / safe
  ece = float(np.sum(count / len(labels) * np.abs(accuracy - mean_confidence)))
  return Reliability(accuracy, mean_confidence, count, ece, float(correct.mean()),
                     float(confidence.mean()))
