"""Array stores: build and open, resume after a kill, stale metadata, atomic completion."""
import os

import numpy as np
import pytest

from kd_jax import array_store

ROWS = 10  # With CHUNK = 3: chunks [0, 3) [3, 6) [6, 9) [9, 10), the last one short.
CHUNK = 3
ARRAYS = {"logits": ((ROWS, 4), np.float32), "ids": ((ROWS, 4), np.int32)}
METADATA = {"teacher": "abc123", "temperature": 2.0, "k": 4, "window": [64, 65]}


def rows(start, stop):
  """Row r of `logits` is r + [0, .1, .2, .3] and of `ids` 10 r + [0, 1, 2, 3]."""
  r = np.arange(start, stop)[:, None]
  return {"logits": (r + np.arange(4) / 10).astype(np.float32),
          "ids": (10 * r + np.arange(4)).astype(np.int32)}


class Recorder:
  """`fill` that records its calls and raises after `fail_after` of them (a simulated kill)."""

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = [], fail_after

  def __call__(self, start, stop):
    if self.fail_after is not None and len(self.calls) == self.fail_after:
      raise KeyboardInterrupt("killed")
    self.calls.append((start, stop))
    return rows(start, stop)


def test_build_then_open_gives_what_fill_returned(tmp_path):
  directory = str(tmp_path / "cache")
  fill = Recorder()
  built = array_store.build(directory, METADATA, ARRAYS, fill, chunk_rows=CHUNK)
  assert fill.calls == [(0, 3), (3, 6), (6, 9), (9, 10)]
  opened = array_store.open_store(directory, METADATA, ARRAYS)
  for arrays in (built, opened):
    assert sorted(arrays) == ["ids", "logits"]
    for name, expected in rows(0, ROWS).items():
      np.testing.assert_array_equal(arrays[name], expected)
      assert arrays[name].dtype == expected.dtype and not arrays[name].flags.writeable
  again = Recorder()
  array_store.build(directory, METADATA, ARRAYS, again, chunk_rows=CHUNK)  # Complete: opened.
  assert not again.calls
  assert sorted(os.listdir(tmp_path)) == ["cache"]  # The partial directory was renamed.


def test_a_killed_build_resumes_without_recomputing_and_matches_an_uninterrupted_one(tmp_path):
  directory = str(tmp_path / "cache")
  killed = Recorder(fail_after=2)
  with pytest.raises(KeyboardInterrupt):
    array_store.build(directory, METADATA, ARRAYS, killed, chunk_rows=CHUNK)
  assert killed.calls == [(0, 3), (3, 6)]
  assert not os.path.exists(directory)  # Nothing at the store's path until it is complete.
  with pytest.raises(array_store.StoreError, match="incomplete: its build stopped after 6 rows"):
    array_store.open_store(directory, METADATA)
  resumed = Recorder()
  arrays = array_store.build(directory, METADATA, ARRAYS, resumed, chunk_rows=CHUNK)
  assert resumed.calls == [(6, 9), (9, 10)]  # Rows 0..5 are not computed again.
  straight = array_store.build(str(tmp_path / "straight"), METADATA, ARRAYS, Recorder(),
                               chunk_rows=CHUNK)
  for name in ARRAYS:
    np.testing.assert_array_equal(arrays[name], straight[name])


def test_a_partial_build_with_other_metadata_is_refused_not_mixed(tmp_path):
  directory = str(tmp_path / "cache")
  with pytest.raises(KeyboardInterrupt):
    array_store.build(directory, METADATA, ARRAYS, Recorder(fail_after=1), chunk_rows=CHUNK)
  other = {**METADATA, "temperature": 4.0}
  with pytest.raises(array_store.StaleStoreError, match=r"temperature: 2\.0 → 4\.0") as error:
    array_store.build(directory, other, ARRAYS, Recorder(), chunk_rows=CHUNK)
  assert f"Delete {directory}.partial" in str(error.value)


def test_open_with_other_metadata_or_arrays_names_each_differing_key(tmp_path):
  directory = str(tmp_path / "cache")
  array_store.build(directory, METADATA, ARRAYS, Recorder(), chunk_rows=CHUNK)
  other = {**METADATA, "k": 8, "teacher": "def456"}
  with pytest.raises(array_store.StaleStoreError) as error:
    array_store.open_store(directory, other)
  message = str(error.value)
  assert "k: 4 → 8" in message and "teacher: 'abc123' → 'def456'" in message
  assert "temperature" not in message and f"Delete {directory} to rebuild it" in message
  with pytest.raises(ValueError, match="window: "):  # StaleStoreError is a ValueError.
    array_store.build(directory, {**METADATA, "window": [32, 33]}, ARRAYS, Recorder(),
                      chunk_rows=CHUNK)
  with pytest.raises(array_store.StaleStoreError, match=r"arrays\.ids\.dtype: '<i4' → '<i8'"):
    array_store.open_store(directory, METADATA, {**ARRAYS, "ids": ((ROWS, 4), np.int64)})
  # Tuples and lists are the same metadata (both are JSON lists).
  array_store.open_store(directory, {**METADATA, "window": (64, 65)})


def test_missing_store_and_bad_arguments_are_clear_errors(tmp_path):
  with pytest.raises(array_store.StoreError, match="no array store at"):
    array_store.open_store(str(tmp_path / "nothing"), METADATA)
  directory = str(tmp_path / "cache")
  with pytest.raises(ValueError, match="share their leading dimension"):
    array_store.build(directory, METADATA, {**ARRAYS, "ids": ((ROWS + 1, 4), np.int32)},
                      Recorder(), chunk_rows=CHUNK)
  with pytest.raises(ValueError, match="returned 'logits' of shape"):
    array_store.build(directory, METADATA, ARRAYS,
                      lambda start, stop: {**rows(start, stop), "logits": np.zeros((1, 4))},
                      chunk_rows=CHUNK)
  assert not os.path.exists(directory)


def test_a_corrupt_array_file_is_reported(tmp_path):
  directory = str(tmp_path / "cache")
  array_store.build(directory, METADATA, ARRAYS, Recorder(), chunk_rows=CHUNK)
  np.save(os.path.join(directory, "ids.npy"), np.zeros((ROWS, 3), np.int32))
  with pytest.raises(array_store.StoreError, match=r"ids\.npy holds int32\[10, 3\]"):
    array_store.open_store(directory, METADATA)
