"""DATM start-epoch windows and skip rule; synthetic image and label initialisation."""
import numpy as np
import pytest

from kd_jax.dataset_distill.datm import StartWindow, datm_window, mtt_window, should_update
from kd_jax.dataset_distill.synthetic import (datm_label_logits, init_images, init_labels,
                                              select_real, softmax)


def test_window_widens_linearly_then_stops():
  w = StartWindow(0, 10, 20, expansion_end=100)
  assert [w.upper(i) for i in (0, 50, 99, 100, 1000)] == [10, 15, 19, 20, 20]
  rng = np.random.default_rng(0)
  early = {w.sample(rng, 0) for _ in range(300)}
  late = {w.sample(rng, 500) for _ in range(300)}
  assert early == set(range(10)) and late == set(range(20))


def test_mtt_window_is_fixed_and_datm_table_follows_ipc():
  assert mtt_window(20).upper(0) == mtt_window(20).upper(10**6) == 20
  assert (datm_window(1, expansion_end=10).max_start, datm_window(10, expansion_end=10).upper(0),
          datm_window(50, expansion_end=10).max_start) == (4, 10, 40)
  assert datm_window(1000, expansion_end=0).min_start == 40
  with pytest.raises(ValueError, match="min_start"):
    StartWindow(5, 3, 10)


def test_skip_threshold():
  assert should_update(0.9, 1.0) and not should_update(1.1, 1.0) and should_update(5.0, None)


def test_select_real_prefers_correct_and_keeps_class_order():
  labels = np.array([0, 0, 0, 1, 1, 1])
  correct = np.array([False, True, False, True, True, False])
  idx = select_real(np.random.default_rng(0), labels, 2, 1, correct)
  assert idx[0] == 1 and idx[1] in (3, 4)
  images, ids = init_images(np.random.default_rng(0), np.zeros((6, 2, 2, 1)), labels,
                            num_classes=2, ipc=2, init="noise")
  assert images.shape == (4, 2, 2, 1) and list(ids) == [0, 0, 1, 1]
  with pytest.raises(ValueError, match="ipc"):
    select_real(np.random.default_rng(0), labels, 2, 4)


def test_datm_labels_average_correct_experts():
  class_ids = np.array([0, 1])
  logits = np.array([[[2.0, 0.0], [3.0, 0.0]],    # expert 0: right on image 0, wrong on 1
                     [[4.0, 1.0], [0.0, 1.0]],    # expert 1: right on both
                     [[0.0, 5.0], [1.0, 0.0]]])   # expert 2: wrong on both
  got = datm_label_logits(logits, class_ids)
  np.testing.assert_allclose(got, [[3.0, 0.5], [0.0, 1.0]])
  none_right = datm_label_logits(logits[2:], class_ids)  # falls back to the mean of all
  np.testing.assert_allclose(none_right, logits[2])
  np.testing.assert_allclose(init_labels("probs", class_ids, 2, logits), softmax(logits[0]),
                             rtol=1e-6)
  assert init_labels("hard", class_ids, 2).dtype == np.int32
  with pytest.raises(ValueError, match="expert_logits"):
    init_labels("logits", class_ids, 2)
