"""Random-access example sources: TFDS datasets (array_record, no TensorFlow) and in-memory arrays.

A source is any sequence of examples `{"image": uint8 or float [H, W, C], "label": int or float [K]}` with
`__len__` and `__getitem__`: what `tfds.data_source` returns, or an `ArrayDataSource`.

- `open_source("digits", "train", data_dir)` prepares the embedded digits set on first use (no network).
- `open_source("cifar10", "train[:45000]", data_dir)` reads any dataset the user prepared with
  `tfds build cifar10 --data_dir=DIR --file_format=array_record`.
- `ArrayDataSource(*load_arrays("digits", "train", data_dir))` holds a small split in memory: TFDS decodes each
  example in Python (about 130 us each here), so this is 70x faster per batch for digits.
"""
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from kd_jax.data import digits

EMBEDDED = {"digits": digits.Digits}

# Per-channel mean/std of pixels scaled to [0, 1], as published with each dataset's usual recipe.
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STANDARD_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": _IMAGENET_STATS,
    "imagenette": _IMAGENET_STATS,
    "imagenet_resized": _IMAGENET_STATS,
    "imagenet2012_subset": _IMAGENET_STATS,
}
# Datasets without standard constants get theirs from at most this many leading train examples.
STATS_MAX_EXAMPLES = 10_000


def _base_name(name: str) -> str:
  """`"imagenette/160px-v2:1.0.0"` -> `"imagenette"`."""
  return name.split(":")[0].split("/")[0]


def _prepare_hint(name: str, data_dir) -> str:
  """How to (re-)prepare `name` as array_record in `data_dir`."""
  if _base_name(name) in EMBEDDED:
    return (f"{name!r} is embedded: kd_jax prepares it as array_record on first use, so delete its folder in "
            f"data_dir={data_dir!r} (or choose another, writable data_dir) and open it again.")
  return (f"Prepare it with `tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'} "
          f"--file_format=array_record` (or `tfds.builder({name!r}, data_dir=...).download_and_prepare("
          f"file_format='array_record')`); that build step may need TensorFlow, kd_jax never does.")


def _builder(name: str, data_dir):
  """The TFDS builder of `name` in `data_dir`, preparing an embedded dataset on first use."""
  if _base_name(name) in EMBEDDED:
    builder = EMBEDDED[_base_name(name)](data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset name {name!r}: it is neither embedded in kd_jax ({', '.join(sorted(EMBEDDED))}) nor a "
        f"TFDS dataset or a dataset prepared in data_dir={data_dir!r}. See https://www.tensorflow.org/datasets/"
        f"catalog/overview for TFDS names (e.g. cifar10, cifar100, imagenet2012, imagenette).") from e


def _open(name: str, split: str, data_dir):
  """`(builder, source)`; see `open_source`."""
  builder = _builder(name, data_dir)
  not_prepared = (f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (looked in {builder.data_dir}). "
                  f"{_prepare_hint(name, data_dir)}")
  try:
    source = builder.as_data_source(split=split)
    num_examples = len(source)
  except NotImplementedError as e:  # TFDS's answer for formats without random access.
    if not builder.is_prepared():  # `from None`: TFDS's message claims it is prepared as tfrecord
      raise ValueError(not_prepared) from None
    raise ValueError(f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
                     f"which needs TensorFlow to read; kd_jax reads array_record only. "
                     f"{_prepare_hint(name, data_dir)}") from e
  except (KeyError, ValueError) as e:
    if not builder.is_prepared():
      raise ValueError(not_prepared) from None
    raise ValueError(f"Bad split {split!r} for dataset {name!r}: {e}") from e
  if num_examples == 0:
    raise ValueError(f"Split {split!r} of dataset {name!r} in {builder.data_dir} is empty. "
                     f"{_prepare_hint(name, data_dir)}")
  return builder, source


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None):
  """Random-access source of split `split` (TFDS slicing allowed: `"train[:1100]"`, `"train[90%:]"`).

  Args:
    name: embedded name (`"digits"`) or TFDS name, optionally with config/version (`"imagenette/160px-v2"`).
    split: TFDS split expression.
    data_dir: TFDS data directory; `None` means TFDS's default (`~/tensorflow_datasets`).
    image_size: if set, every image is resized and center-cropped to `image_size` x `image_size`
      (`ResizedSource`); needed for datasets of varying image sizes such as imagenet2012 or imagenette.
  Returns:
    A sequence of example dicts with at least `"image"` and `"label"`.
  Raises:
    ValueError: unknown name, dataset not prepared in `data_dir`, unknown or empty split, or a dataset stored only
      as tfrecord (which would need TensorFlow to read).
  """
  source = _open(name, split, data_dir)[1]
  return source if image_size is None else ResizedSource(source, image_size)


class ArrayDataSource:
  """In-memory source over `(images, labels)`, e.g. a distilled synthetic set, usable wherever a TFDS source is.

  Args:
    images: `[N, H, W, C]` uint8 (pixels 0..255) or float (used as they are).
    labels: `[N]` integer class ids, or `[N, K]` float soft labels.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}; add a channel axis for grayscale.")
    if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
      raise ValueError(f"labels must be [N] class ids or [N, K] soft labels with N={images.shape[0]} like images, "
                       f"got shape {labels.shape}.")
    if labels.ndim == 1 and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels of shape [N] must be integer class ids, got dtype {labels.dtype}.")
    self.images, self.labels = images, labels

  @classmethod
  def from_npz(cls, path: str | os.PathLike, *, image_key: str = "images", label_key: str = "labels"):
    """Loads `images` and `labels` arrays from an `.npz` file (never unpickles)."""
    with np.load(path, allow_pickle=False) as arrays:
      missing = {image_key, label_key} - set(arrays.files)
      if missing:
        raise ValueError(f"{path} lacks arrays {sorted(missing)}; it holds {sorted(arrays.files)}.")
      return cls(arrays[image_key], arrays[label_key])

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


class ResizedSource:
  """Wraps a source so that its images come out `size x size`: the shorter side is resized to `size` (bilinear,
  antialiased, through PIL), then the center is cropped. Labels and other features pass through."""

  def __init__(self, source, size: int):
    if not isinstance(size, (int, np.integer)) or size <= 0:
      raise ValueError(f"image_size must be a positive integer, got {size!r}.")
    self.source, self.size = source, int(size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    example = dict(self.source[index])
    image = np.asarray(example["image"])
    h, w = image.shape[:2]
    scale = self.size / min(h, w)
    new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
    if (new_h, new_w) != (h, w):
      resized = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize(
          (new_w, new_h), Image.Resampling.BILINEAR)
      image = np.asarray(resized).reshape(new_h, new_w, image.shape[-1])
    top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
    example["image"] = image[top:top + self.size, left:left + self.size]
    return example


def gather(source, indices) -> tuple[np.ndarray, np.ndarray]:
  """Stacked `(images [n, H, W, C], labels [n] or [n, K])` of `source` at `indices`."""
  indices = np.asarray(indices, np.int64)
  if isinstance(source, ArrayDataSource):
    return source.images[indices], source.labels[indices]
  examples = [source[int(i)] for i in indices]
  missing = {"image", "label"} - set(examples[0]) if examples else set()
  if missing:
    raise ValueError(f"Examples must have 'image' and 'label' features; missing {sorted(missing)} in "
                     f"{sorted(examples[0])}.")
  try:
    images = np.stack([e["image"] for e in examples])
  except ValueError as e:
    raise ValueError("Images in one batch have different shapes "
                     f"({sorted({ex['image'].shape for ex in examples})}); open the source with "
                     "`open_source(..., image_size=S)` to resize them to S x S.") from e
  return images, np.stack([np.asarray(e["label"]) for e in examples])


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Whole split in memory: `(images uint8 [N, H, W, C], labels int32 [N])`. Meant for small datasets."""
  source = open_source(name, split, data_dir, image_size=image_size)
  images, labels = gather(source, np.arange(len(source)))
  return images, labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and the input pipeline need to know about a dataset.

  Attributes:
    name: dataset name as given.
    num_classes: number of label classes.
    image_shape: `(H, W, C)`.
    mean, std: per-channel statistics of pixels scaled to [0, 1]; normalise as `(x / 255 - mean) / std`.
    splits: TFDS `SplitDict` of the stored splits.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  splits: tfds.core.SplitDict

  def num_examples(self, split: str) -> int:
    """Examples in `split`, slicing allowed: `num_examples("train[:1100]")`."""
    return self.splits[split].num_examples


def _channel_stats(source, max_examples: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  images, _ = gather(source, np.arange(min(len(source), max_examples)))
  pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


def dataset_info(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 stats_split: str = "train") -> DatasetInfo:
  """`DatasetInfo` of a prepared dataset, as `open_source(name, ..., image_size=image_size)` yields it.

  mean/std are the dataset's standard constants (`STANDARD_STATS`), else computed from the first
  `STATS_MAX_EXAMPLES` examples of `stats_split`.
  """
  builder, source = _open(name, stats_split, data_dir)
  features = builder.info.features
  height, width, channels = features["image"].shape
  if image_size is not None:
    source, height, width = ResizedSource(source, image_size), image_size, image_size
  if height is None or width is None:
    raise ValueError(f"Images of {name!r} vary in size; pass image_size=S to resize them to S x S.")
  mean, std = STANDARD_STATS.get(_base_name(name)) or _channel_stats(source, STATS_MAX_EXAMPLES)
  return DatasetInfo(name=name, num_classes=features["label"].num_classes, image_shape=(height, width, channels),
                     mean=mean, std=std, splits=builder.info.splits)
