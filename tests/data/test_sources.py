"""Sources: split slicing, clear errors, in-memory arrays, and the generic TFDS path (mocked cifar10)."""
import sys

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import data


class TinyStripes(tfds.core.GeneratorBasedBuilder):
  """A user-prepared TFDS dataset unknown to kd_jax: 12 train / 5 test images [6, 4, 3] with pixels = label."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # See kd_jax/data/digits.py.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(6, 4, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

  def _generate_examples(self, num):
    for i in range(num):
      yield i, {"image": np.full((6, 4, 3), i % 3, np.uint8), "label": i % 3}


def test_user_prepared_dataset_through_the_generic_path(tmp_path):
  TinyStripes(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  source = data.open_source("tiny_stripes", "train[2:]", tmp_path)
  assert len(source) == 10
  info = data.dataset_info("tiny_stripes", tmp_path)
  assert info.num_classes == 3 and info.image_shape == (6, 4, 3) and info.num_examples("test") == 5
  images, labels = data.gather(source, np.arange(10))
  np.testing.assert_array_equal(images, np.broadcast_to(labels[:, None, None, None], images.shape))
  np.testing.assert_allclose(info.mean, [np.mean(np.arange(12) % 3) / 255] * 3, rtol=1e-6)
  resized = data.dataset_info("tiny_stripes", tmp_path, image_size=2)
  assert resized.image_shape == (2, 2, 3)
  assert "tensorflow" not in sys.modules


def test_split_slicing_carves_validation_from_train(digits_dir):
  train, _ = data.load_arrays("digits", "train", digits_dir)
  head, _ = data.load_arrays("digits", "train[:1100]", digits_dir)
  tail, _ = data.load_arrays("digits", "train[1100:]", digits_dir)
  assert len(head) == 1100 and len(tail) == 200
  np.testing.assert_array_equal(np.concatenate([head, tail]), train)


def test_unknown_name_lists_embedded_and_points_to_tfds(tmp_path):
  with pytest.raises(ValueError, match=r"'no_such_set'.*digits.*tensorflow.org/datasets"):
    data.open_source("no_such_set", "train", tmp_path)


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="not prepared") as error:
    data.open_source("cifar10", "train", tmp_path)
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message


def test_tfrecord_only_dataset_says_how_to_reprepare(tmp_path):
  builder = tfds.builder("cifar10", data_dir=tmp_path, file_format="tfrecord")
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)  # What `tfds build cifar10` leaves, less the shards.
  (builder.data_path / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(ValueError, match=r"stored as tfrecord.*array_record only") as error:
    data.open_source("cifar10", "train", tmp_path)
  assert "--file_format=array_record" in str(error.value)
  assert "tensorflow" not in sys.modules


def test_unknown_split_names_dataset(digits_dir):
  with pytest.raises(ValueError, match=r"'validation'.*'digits'.*train.*test"):
    data.open_source("digits", "validation", digits_dir)


def test_mocked_cifar10_through_the_generic_path(tmp_path):
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.open_source("cifar10", "train", tmp_path)
    info = data.dataset_info("cifar10", tmp_path)
  assert len(source) == 24
  assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
  assert info.mean == data.sources.STANDARD_STATS["cifar10"][0]
  batch = next(data.train_batches(source, batch_size=8, seed=0, augment=data.AUGMENT_PRESETS["cifar10"],
                                  mean=info.mean, std=info.std))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and np.all((batch["label"] >= 0) & (batch["label"] < 10))
  assert "tensorflow" not in sys.modules


def test_array_source_matches_arrays_and_round_trips_npz(tmp_path):
  images = np.arange(5 * 4 * 4 * 3, dtype=np.float32).reshape(5, 4, 4, 3)
  soft = np.full((5, 10), 0.1, np.float32)
  np.savez(tmp_path / "syn.npz", images=images, labels=soft)
  source = data.ArrayDataSource.from_npz(tmp_path / "syn.npz")
  assert len(source) == 5
  np.testing.assert_array_equal(source[3]["image"], images[3])
  got_images, got_labels = data.gather(source, [4, 0])
  np.testing.assert_array_equal(got_images, images[[4, 0]])
  np.testing.assert_array_equal(got_labels, soft[[4, 0]])


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((4, 8, 8)), np.zeros(4, int), r"\[N, H, W, C\]"),
    (np.zeros((4, 8, 8, 1)), np.zeros(3, int), "N=4"),
    (np.zeros((4, 8, 8, 1)), np.zeros(4), "integer class ids"),
])
def test_array_source_rejects_bad_arrays(images, labels, match):
  with pytest.raises(ValueError, match=match):
    data.ArrayDataSource(images, labels)


def test_npz_without_the_arrays_names_them(tmp_path):
  np.savez(tmp_path / "x.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match=r"lacks arrays \['images', 'labels'\]"):
    data.ArrayDataSource.from_npz(tmp_path / "x.npz")


def test_resized_source_shrinks_the_shorter_side_and_center_crops():
  image = np.zeros((40, 20, 3), np.uint8)
  image[10:30] = 200  # The central 20 rows of the tall image are bright.
  source = data.ResizedSource(data.ArrayDataSource(image[None], np.array([7])), 10)
  example = source[0]
  assert example["image"].shape == (10, 10, 3) and example["image"].dtype == np.uint8 and example["label"] == 7
  np.testing.assert_array_equal(example["image"][1:-1], 200)  # The center crop kept the bright band.
  gray = data.ResizedSource(data.ArrayDataSource(np.ones((1, 5, 9, 1), np.uint8), np.array([0])), 3)
  np.testing.assert_array_equal(gray[0]["image"], np.ones((3, 3, 1)))


def test_variable_size_datasets_need_image_size(tmp_path):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="vary in size; pass image_size"):
      data.dataset_info("imagenet2012", tmp_path)
    info = data.dataset_info("imagenet2012", tmp_path, image_size=16)
    source = data.open_source("imagenet2012", "validation", tmp_path, image_size=16)
    with pytest.raises(ValueError, match="image_size=S"):
      data.gather(data.open_source("imagenet2012", "validation", tmp_path), np.arange(6))
  assert info.image_shape == (16, 16, 3) and info.num_classes == 1000
  assert info.mean == data.sources.STANDARD_STATS["imagenet2012"][0]
  batch = next(data.eval_batches(source, batch_size=4, mean=info.mean, std=info.std))
  assert batch["image"].shape == (4, 16, 16, 3)
