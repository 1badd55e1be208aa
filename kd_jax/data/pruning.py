"""Data pruning: per-example scores and the subset of a transfer set that is kept.

Scores (higher = harder):

- `random`: uniform draws, so the kept subset is a uniform random one (the baseline that, with
  KD, matches or beats score-based pruning in Ben-Baruch et al., "Distilling the Knowledge in
  Data Pruning", 2024);
- `el2n`: ‖softmax(f(x)) − onehot(y)‖₂ of a network early in its training, averaged over
  independent runs (Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021);
- `forgetting`: the number of times an example goes from classified correctly to misclassified
  between consecutive epochs; an example never classified correctly scores as many as there are
  epochs, above any count (Toneva et al., "An Empirical Study of Example Forgetting during Deep
  Neural Network Learning", ICLR 2019). Correctness is read at the end of each epoch on the
  un-augmented example, not at its minibatch during the epoch as in the paper.

`kept` keeps the hardest (highest-scoring) examples by default, as Paul et al. and Toneva et al.
do (they prune the easy and the unforgettable ones), and as Ben-Baruch et al. do for their
score-based methods; `keep="easiest"` keeps the other end (better when very few examples are
kept, Sorscher et al., "Beyond neural scaling laws", NeurIPS 2022). Ties are broken at random.
The networks that score (the KD job's short teacher runs) are trained by the job; this module
turns their logits into scores.
"""
import numpy as np

from kd_jax.data.subsets import subset

SCORES = ("random", "el2n", "forgetting")
SIDES = ("hardest", "easiest")


def el2n(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`[N]` EL2N scores: the L2 norm of softmax(logits) − onehot(labels).

  Args:
    logits: `[..., N, C]`; leading axes (independent runs) are averaged over.
    labels: `[N]` class ids.
  """
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  error = probs - np.eye(logits.shape[-1])[np.asarray(labels)]
  norms = np.linalg.norm(error, axis=-1)
  return norms.reshape(-1, norms.shape[-1]).mean(0)


def forgetting(correct: np.ndarray) -> np.ndarray:
  """`[N]` forgetting counts from `correct` `[..., E, N]` (bool, per epoch): the number of
  correct → incorrect transitions between consecutive epochs, E for an example never correct;
  leading axes (independent runs) are averaged over."""
  correct = np.asarray(correct, bool)
  events = (correct[..., :-1, :] & ~correct[..., 1:, :]).sum(-2).astype(np.float64)
  counts = np.where(correct.any(-2), events, correct.shape[-2])
  return counts.reshape(-1, counts.shape[-1]).mean(0)


def scores(score: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`[N]` scores from the logits `[runs, epochs, N, C]` of the scoring runs: EL2N of the last
  epoch, or forgetting over all epochs."""
  if score == "el2n":
    return el2n(np.asarray(logits)[:, -1], labels)
  if score == "forgetting":
    return forgetting(np.asarray(logits).argmax(-1) == np.asarray(labels))
  raise ValueError(f"score {score!r} is not computed from logits; valid: el2n, forgetting")


def random_scores(num_examples: int, seed: int) -> np.ndarray:
  """`[N]` uniform scores drawn with `seed`."""
  return np.random.default_rng([seed, 1]).random(num_examples)


def num_kept(num_examples: int, fraction: float) -> int:
  """How many of `num_examples` remain when `fraction` of them is pruned (at least one)."""
  if not 0 <= fraction < 1:
    raise ValueError(f"the pruned fraction must be in [0, 1), got {fraction}")
  return max(1, round((1 - fraction) * num_examples))


def kept(example_scores: np.ndarray, fraction: float, keep: str, seed: int) -> np.ndarray:
  """Sorted positions of the examples kept when `fraction` is pruned: the highest scores
  (`keep="hardest"`) or the lowest (`"easiest"`), ties broken at random with `seed`."""
  if keep not in SIDES:
    raise ValueError(f"keep={keep!r} is unknown; valid: {', '.join(SIDES)}")
  example_scores = np.asarray(example_scores, np.float64)
  n = len(example_scores)
  ties = np.random.default_rng([seed, 2]).random(n)
  order = np.lexsort((ties, -example_scores if keep == "hardest" else example_scores))
  return np.sort(order[:num_kept(n, fraction)])


def prune(source, example_scores: np.ndarray, fraction: float, keep: str, seed: int):
  """`source` without the pruned examples (`kept`)."""
  return subset(source, kept(example_scores, fraction, keep, seed))
