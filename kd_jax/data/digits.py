"""The embedded dataset: scikit-learn's bundled handwritten digits as a TFDS builder.

1,797 real 8x8 grayscale digits (UCI optical recognition set, as shipped inside scikit-learn; no network). Pixel
values 0..16 are rescaled to uint8 0..255 with `round(x * 255 / 16)`. The train/test split is fixed: a permutation
of the 1,797 indices drawn from numpy's legacy `RandomState(0)` (whose stream numpy keeps frozen), first 1,300 for
train, last 497 for test. Examples are written in that order (shuffling disabled), so `train[:1100]` means the same
images everywhere.

Prepared as array_record and read through `builder.as_data_source()`; TensorFlow is never imported.
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1300
NUM_TEST = 497
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """Indices into `sklearn.datasets.load_digits()` of each split, in stored order."""
  permutation = np.random.RandomState(SPLIT_SEED).permutation(NUM_TRAIN + NUM_TEST)
  return {"train": permutation[:NUM_TRAIN], "test": permutation[NUM_TRAIN:]}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits: image uint8 [8, 8, 1], label 0..9; 1,300 train / 497 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed 1,300/497 split from RandomState(0); pixels round(x * 255 / 16)."}
  # TFDS derives this from the package through `importlib_resources`, which it does not install on Python >= 3.9.
  code_path = epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled UCI handwritten digits, 8x8 grayscale.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Bundled with scikit-learn: nothing to download.
    return {split: self._generate_examples(indices) for split, indices in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    for position, index in enumerate(indices):
      yield position, {"image": images[index], "label": int(digits.target[index])}
