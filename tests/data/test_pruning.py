"""Data-pruning scores (EL2N, forgetting, random) and the kept subset."""
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import pruning


def test_el2n_is_zero_for_a_perfect_predictor_and_averages_runs():
  labels = np.array([0, 2, 1])
  perfect = 100.0 * np.eye(3)[labels]
  np.testing.assert_allclose(pruning.el2n(perfect, labels), 0.0, atol=1e-12)
  uniform = np.zeros((3, 3))  # softmax 1/3 each: ‖(1/3 − 1, 1/3, 1/3)‖ = √(4/9 + 2/9)
  np.testing.assert_allclose(pruning.el2n(uniform, labels), np.sqrt(6) / 3)
  runs = np.stack([perfect, uniform])
  np.testing.assert_allclose(pruning.el2n(runs, labels), np.sqrt(6) / 6)


def test_forgetting_counts_correct_to_incorrect_transitions():
  correct = np.array([[1, 0, 1, 1, 0],
                      [0, 1, 1, 1, 0],
                      [1, 1, 0, 1, 0],
                      [0, 1, 1, 0, 0]], bool)  # [epochs, examples]
  # Example 0: 1→0 twice; 1: learned once, never forgotten; 2: once; 3: once, at the end;
  # 4: never correct, scored as the number of epochs (above any count).
  np.testing.assert_array_equal(pruning.forgetting(correct), [2, 0, 1, 1, 4])
  np.testing.assert_array_equal(pruning.forgetting(np.stack([correct, ~correct])),
                                [1.5, 0.5, 1, 0.5, 2])


def test_scores_from_logits_use_the_last_epoch_for_el2n_and_every_epoch_for_forgetting():
  labels = np.array([0, 1])
  right, wrong = 50.0 * np.eye(2), 50.0 * np.eye(2)[::-1]
  logits = np.stack([[right, wrong, right]])  # [runs=1, epochs=3, N=2, C=2]
  np.testing.assert_allclose(pruning.scores("el2n", logits, labels), 0.0, atol=1e-12)
  np.testing.assert_array_equal(pruning.scores("forgetting", logits, labels), [1, 1])
  with pytest.raises(ValueError, match="score 'random' is not computed from logits"):
    pruning.scores("random", logits, labels)


def test_kept_subset_has_the_size_and_the_side_asked_for():
  scores = np.array([0.5, 3.0, 1.0, 2.0, 0.0, 4.0, 2.5, 1.5, 3.5, 0.2])
  hardest = pruning.kept(scores, 0.3, "hardest", seed=0)
  assert hardest.tolist() == [1, 2, 3, 5, 6, 7, 8]  # the 7 highest, in source order
  assert pruning.kept(scores, 0.7, "easiest", seed=0).tolist() == [0, 4, 9]
  assert len(pruning.kept(scores, 0.0, "hardest", seed=0)) == 10
  assert len(pruning.kept(scores, 0.99, "hardest", seed=0)) == 1


def test_ties_are_broken_at_random_with_the_seed():
  ties = np.zeros(100)
  picks = {tuple(pruning.kept(ties, 0.5, "hardest", seed=s)) for s in (0, 0, 1)}
  assert len(picks) == 2 and all(len(p) == 50 for p in picks)
  random = pruning.random_scores(100, seed=3)
  np.testing.assert_array_equal(random, pruning.random_scores(100, seed=3))
  assert not np.array_equal(random, pruning.random_scores(100, seed=4))


def test_prune_keeps_those_rows_of_the_source():
  images = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2, 1)
  source = data.ArrayDataSource(images, np.arange(10, dtype=np.int32) % 3)
  pruned = pruning.prune(source, np.arange(10.0), 0.4, "hardest", seed=0)
  np.testing.assert_array_equal(pruned.images, images[4:])


@pytest.mark.parametrize("fraction,keep,message", [
    (1.0, "hardest", r"the pruned fraction must be in \[0, 1\), got 1.0"),
    (-0.1, "hardest", r"the pruned fraction must be in \[0, 1\)"),
    (0.5, "middle", r"keep='middle' is unknown; valid: hardest, easiest"),
])
def test_bad_fraction_or_side_is_rejected(fraction, keep, message):
  with pytest.raises(ValueError, match=message):
    pruning.kept(np.arange(5.0), fraction, keep, seed=0)
