"""Subsets of a source's examples: a class left out, a stratified labeled fraction, a range.

Used to build transfer sets (Hinton's omitted-class experiment, small labeled subsets) and to
carve a validation split from train. Indices are positions in the source, sorted.
"""
import numpy as np

from kd_jax.data.sources import ArrayDataSource, gather


class IndexedSource:
  """The examples of `source` at `indices`, as a source (random access, `len`)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


def subset(source, indices):
  """`source` restricted to `indices`: an `ArrayDataSource` stays in memory (sliced arrays)."""
  if isinstance(source, ArrayDataSource):
    return ArrayDataSource(source.images[np.asarray(indices, np.int64)],
                           source.labels[np.asarray(indices, np.int64)])
  return IndexedSource(source, indices)


def class_ids(source) -> np.ndarray:
  """`[N]` integer labels of every example of `source` (argmax of soft labels)."""
  labels = source.labels if isinstance(source, ArrayDataSource) else gather(
      source, np.arange(len(source)))[1]
  return labels.argmax(-1) if labels.ndim == 2 else labels


def without_class(labels: np.ndarray, cls: int) -> np.ndarray:
  """Positions of the examples whose label is not `cls`."""
  labels = np.asarray(labels)
  if not 0 <= cls <= labels.max():
    raise ValueError(f"class {cls} is not among the labels 0..{labels.max()}")
  return np.flatnonzero(labels != cls)


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Positions of `fraction` of the examples of each class (at least one each), drawn with `seed`."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    chosen.append(rng.permutation(members)[:max(1, round(fraction * len(members)))])
  return np.sort(np.concatenate(chosen))
