"""Train/eval batches: determinism, resume, epochs, per-host sharding, eval padding, prefetch."""
import itertools

import numpy as np
import pytest

from kd_jax import data

N = 50  # Examples; with BATCH = 8, 6 steps per epoch and 2 dropped.
BATCH = 8
AUGMENT = data.AugmentConfig(crop_padding=1, flip=True)


@pytest.fixture
def source():
  """Example i has label i and image pixels i, so batches reveal which examples they hold."""
  images = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 4, 4, 2)).copy()
  return data.ArrayDataSource(images, np.arange(N))


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_batches_other_seed_differs(source):
  a = take(data.train_batches(source, batch_size=BATCH, seed=3, augment=AUGMENT), 4)
  b = take(data.train_batches(source, batch_size=BATCH, seed=3, augment=AUGMENT, prefetch=0), 4)
  c = take(data.train_batches(source, batch_size=BATCH, seed=4, augment=AUGMENT), 4)
  assert_same(a, b)
  assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def test_resume_sees_the_tail_of_the_uninterrupted_stream(source):
  full = take(data.train_batches(source, batch_size=BATCH, seed=0, augment=AUGMENT), 15)
  for start in (1, 5, 6, 13):  # Within, at and across epoch boundaries.
    resumed = take(data.train_batches(source, batch_size=BATCH, seed=0, start_step=start, augment=AUGMENT),
                   15 - start)
    assert_same(resumed, full[start:])


def test_each_epoch_draws_distinct_examples_and_drops_the_remainder(source):
  steps = data.steps_per_epoch(N, BATCH)
  batches = take(data.train_batches(source, batch_size=BATCH, seed=1), 2 * steps)
  epochs = [np.concatenate([b["label"] for b in batches[e * steps:(e + 1) * steps]]) for e in range(2)]
  for labels in epochs:
    assert len(np.unique(labels)) == steps * BATCH
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled each epoch.
  for b in batches:
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
    np.testing.assert_array_equal(b["mask"], np.ones(BATCH))
    # No augmentation: image pixels are the label (scaled to [0, 1]).
    np.testing.assert_allclose(b["image"], np.broadcast_to(b["label"][:, None, None, None] / 255, (BATCH, 4, 4, 2)),
                               rtol=1e-6)


def test_hosts_partition_the_global_batch_including_augmentation(source):
  single = take(data.train_batches(source, batch_size=BATCH, seed=2, start_step=4, augment=AUGMENT), 5)
  hosts = [take(data.train_batches(source, batch_size=BATCH, seed=2, start_step=4, augment=AUGMENT,
                                   process_index=i, process_count=4), 5) for i in range(4)]
  for step, whole in enumerate(single):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), whole[key])


@pytest.mark.parametrize("batch_size, process_count", [(8, 1), (8, 2), (10, 2), (64, 4)])
def test_eval_covers_every_example_once_with_padding_masked(source, batch_size, process_count):
  hosts = [list(data.eval_batches(source, batch_size=batch_size, mean=0.5, std=0.25, process_index=i,
                                  process_count=process_count)) for i in range(process_count)]
  num_batches = data.num_eval_batches(N, batch_size)
  assert all(len(h) == num_batches for h in hosts)
  seen = []
  for step in range(num_batches):
    for h in hosts:
      batch = h[step]
      assert batch["image"].shape == (batch_size // process_count, 4, 4, 2)
      real = batch["mask"] == 1
      seen.extend(batch["label"][real])
      expected = (batch["label"][real, None, None, None] / 255 - 0.5) / 0.25
      np.testing.assert_allclose(batch["image"][real], np.broadcast_to(expected, (real.sum(), 4, 4, 2)), rtol=1e-5)
      assert not batch["image"][~real].any() and not batch["label"][~real].any()
  np.testing.assert_array_equal(seen, np.arange(N))  # In order, each once.


def test_soft_labels_come_out_float(source):
  soft = data.ArrayDataSource(source.images, np.eye(N, dtype=np.float64)[:, :10])
  batch = next(data.train_batches(soft, batch_size=BATCH, seed=0))
  assert batch["label"].dtype == np.float32 and batch["label"].shape == (BATCH, 10)


def test_errors_in_the_prefetch_thread_reach_the_caller():

  class Broken:

    def __len__(self):
      return 20

    def __getitem__(self, index):
      raise OSError(f"cannot read record {index}")

  with pytest.raises(OSError, match="cannot read record"):
    next(data.train_batches(Broken(), batch_size=4, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 6, "process_count": 4}, "divisible by process_count=4"),
    ({"batch_size": 8, "process_index": 2, "process_count": 2}, "process_index"),
    ({"batch_size": 64}, "larger than the 50 examples"),
    ({"batch_size": 8, "seed": -1}, "seed"),
    ({"batch_size": 8, "start_step": -1}, "start_step"),
])
def test_bad_arguments_raise_at_call_time(source, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.train_batches(source, **{"seed": 0, **kwargs})
