"""The standard-library corpus: vocabulary, file lists, windows, train and eval batches."""
import itertools
import os
import pathlib
import sysconfig

import numpy as np
import pytest

from kd_jax.sequence import corpus

N = 23  # Windows; with BATCH = 4, 5 steps per epoch and 3 windows dropped.
BATCH = 4
LENGTH = 5


@pytest.fixture
def windows():
  return corpus.windows(np.arange(N * LENGTH + 1, dtype=np.int32), LENGTH)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_encode_decode_round_trip_and_unknown_characters():
  ascii_text = "\tdef f(x):\n  return x ~ {'a': 1}\n" + "".join(map(chr, range(32, 127)))
  ids = corpus.encode(ascii_text)
  assert ids.dtype == np.int32 and ids.shape == (len(ascii_text),)
  assert ids.min() >= 0 and ids.max() < corpus.UNKNOWN_ID
  assert len(set(ids.tolist())) == len(set(ascii_text))  # One id per distinct character.
  assert corpus.decode(ids) == ascii_text
  ids = corpus.encode("é\r→x\x00😀")
  np.testing.assert_array_equal(ids[[0, 1, 2, 4, 5]], corpus.UNKNOWN_ID)
  assert corpus.decode(ids) == "\ufffd\ufffd\ufffdx\ufffd\ufffd"
  assert corpus.VOCAB_SIZE == 98 and corpus.UNKNOWN_CHAR == "\ufffd"


def test_file_lists_are_disjoint_and_exist():
  assert not set(corpus.TRAIN_FILES) & set(corpus.VALIDATION_FILES)
  root = sysconfig.get_paths()["stdlib"]
  for name in corpus.TRAIN_FILES + corpus.VALIDATION_FILES:
    assert os.path.isfile(os.path.join(root, name)), name


def test_load_corpus_sizes_and_fingerprint(monkeypatch):
  loaded = corpus.load_corpus()
  assert loaded.train.dtype == np.int32 and loaded.validation.dtype == np.int32
  assert 700_000 < len(loaded.train) < 1_500_000 and 100_000 < len(loaded.validation) < 250_000
  first = pathlib.Path(sysconfig.get_paths()["stdlib"], corpus.TRAIN_FILES[0])
  assert corpus.decode(loaded.train[:200]) == first.read_text(encoding="utf-8")[:200]
  assert loaded.fingerprint == corpus.load_corpus().fingerprint and len(loaded.fingerprint) == 64
  monkeypatch.setattr(corpus, "VALIDATION_FILES", corpus.VALIDATION_FILES[1:])
  assert corpus.load_corpus().fingerprint != loaded.fingerprint
  monkeypatch.setattr(corpus, "VALIDATION_FILES", ("no_such_module.py",))
  with pytest.raises(ValueError, match=r"no_such_module\.py is missing .* Python 3\."):
    corpus.load_corpus()


def test_windows_shape_and_overlap():
  ids = np.arange(23, dtype=np.int32)
  w = corpus.windows(ids, 5)
  assert w.shape == (4, 6) and w.dtype == np.int32  # 22 targets fit 4 windows; 2 ids dropped.
  np.testing.assert_array_equal(w[:, -1], w[1:, 0].tolist() + [20])  # Consecutive share one id.
  np.testing.assert_array_equal(w[:, :-1].ravel(), ids[:20])  # Inputs cover each position once.
  np.testing.assert_array_equal(w[:, 1:].ravel(), ids[1:21])
  assert corpus.windows(ids, 22).shape == (1, 23)
  with pytest.raises(ValueError, match="too few"):
    corpus.windows(ids, 23)


def test_train_batches_resume_inside_the_second_epoch(windows):
  full = take(corpus.train_batches(windows, batch_size=BATCH, seed=7), 12)
  start = 7  # Step 2 of epoch 1.
  resumed = take(corpus.train_batches(windows, batch_size=BATCH, seed=7, start_step=start), 5)
  for a, b in zip(full[start:], resumed, strict=True):
    assert a.keys() == b.keys() == {"tokens", "index", "mask"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = take(corpus.train_batches(windows, batch_size=BATCH, seed=8), 12)
  assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(full, other))


def test_every_window_appears_once_per_epoch_and_hosts_split_the_batch(windows):
  steps = N // BATCH
  batches = take(corpus.train_batches(windows, batch_size=BATCH, seed=0), 2 * steps)
  epochs = [np.concatenate([b["index"] for b in batches[e * steps:(e + 1) * steps]])
            for e in range(2)]
  for seen in epochs:
    assert len(np.unique(seen)) == steps * BATCH
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled each epoch.
  for b in batches:
    assert b["tokens"].dtype == np.int32 and b["index"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"], windows[b["index"]])
    np.testing.assert_array_equal(b["mask"], np.ones((BATCH, LENGTH), np.float32))
  hosts = [take(corpus.train_batches(windows, batch_size=BATCH, seed=0, process_index=i,
                                     process_count=2), 2 * steps) for i in range(2)]
  for b, first, second in zip(batches, *hosts):
    np.testing.assert_array_equal(np.concatenate([first["tokens"], second["tokens"]]), b["tokens"])


def test_eval_batches_cover_every_window_once_and_mask_the_padding(windows):
  batches = list(corpus.eval_batches(windows, batch_size=BATCH))
  assert len(batches) == 6  # 23 windows: 5 full batches and one of 3 + 1 padding row.
  for b in batches:
    assert b["tokens"].shape == (BATCH, LENGTH + 1) and b["mask"].shape == (BATCH, LENGTH)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask[:N], 1)
  np.testing.assert_array_equal(mask[N:], 0)
  tokens = np.concatenate([b["tokens"] for b in batches])
  np.testing.assert_array_equal(tokens[:N], windows)
  np.testing.assert_array_equal(tokens[N:], 0)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches])[:N], np.arange(N))


def test_bad_batch_arguments_fail_when_called():
  w = corpus.windows(np.arange(21, dtype=np.int32), 5)
  with pytest.raises(ValueError, match="larger than the 4 examples"):
    corpus.train_batches(w, batch_size=8, seed=0)
  with pytest.raises(ValueError, match="seed"):
    corpus.train_batches(w, batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="divisible by process_count"):
    corpus.eval_batches(w, batch_size=3, process_count=2)
