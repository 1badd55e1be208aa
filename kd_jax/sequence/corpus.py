"""A character-level corpus from the Python standard library's own source files.

The files lie on every machine that runs kd_jax, so language-model distillation needs no
download. `TRAIN_FILES` (about 1 MB) and `VALIDATION_FILES` (about 150 KB) are fixed, disjoint
lists of long-lived pure-Python modules present in CPython 3.10 to 3.13; their text differs a
little between Python versions, so `Corpus.fingerprint` and `Corpus.python_version` record
exactly which text a result saw.

Characters map to `VOCAB_SIZE` ids: tab, newline and printable ASCII (32–126) have their own
ids; any other character is `UNKNOWN_ID`, which `decode` shows as `UNKNOWN_CHAR` (U+FFFD).

Batches follow `kd_jax.data.pipeline`: step `s` reads windows `perm_e[k * B:(k + 1) * B]` with
`e, k = divmod(s, N // B)` and `perm_e` drawn from `(seed, e)`, so a batch depends only on
`(seed, s)` and process `i` of `n` takes rows `[i * B / n, (i + 1) * B / n)` of it.
"""
import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Iterator

import numpy as np

# The image pipeline's batch arithmetic: the same host slices and epoch permutations.
from kd_jax.data.pipeline import batch_indices, host_rows, num_eval_batches, pad_rows

# Paths relative to `sysconfig.get_paths()["stdlib"]`.
TRAIN_FILES = (
    "argparse.py", "bisect.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "copy.py", "dataclasses.py", "difflib.py", "fractions.py", "functools.py",
    "heapq.py", "logging/__init__.py", "operator.py", "pickle.py", "pprint.py", "random.py",
    "shutil.py", "statistics.py", "subprocess.py", "tempfile.py", "textwrap.py", "threading.py",
)
VALIDATION_FILES = (
    "base64.py", "csv.py", "fnmatch.py", "gettext.py", "glob.py", "queue.py", "sched.py",
    "shlex.py", "tokenize.py", "weakref.py",
)

VOCABULARY = "\t\n" + "".join(map(chr, range(32, 127)))
UNKNOWN_ID = len(VOCABULARY)
UNKNOWN_CHAR = "\ufffd"
VOCAB_SIZE = UNKNOWN_ID + 1

_IDS = np.full(128, UNKNOWN_ID, np.int32)  # ASCII code point -> id
_IDS[[ord(c) for c in VOCABULARY]] = np.arange(UNKNOWN_ID)
_CHARS = np.array(list(VOCABULARY + UNKNOWN_CHAR))


def encode(text: str) -> np.ndarray:
  """`[len(text)]` int32 ids of `text`'s characters."""
  points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  return np.where(points < 128, _IDS[np.minimum(points, 127)], UNKNOWN_ID).astype(np.int32)


def decode(ids) -> str:
  """The text of `ids` (`[n]` integers); `UNKNOWN_ID` becomes `UNKNOWN_CHAR`."""
  return "".join(_CHARS[np.asarray(ids, np.int64)])


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """Encoded splits: `train` and `validation` are `[n]` int32 ids; `fingerprint` is a sha256 of
  the vocabulary and each split's file names and texts; `python_version` read them."""
  train: np.ndarray
  validation: np.ndarray
  fingerprint: str
  python_version: str


def load_corpus() -> Corpus:
  """Reads and encodes `TRAIN_FILES` and `VALIDATION_FILES` of this Python's standard library.

  Raises:
    ValueError: a file is missing from the standard library (the message names it).
  """
  root, version = sysconfig.get_paths()["stdlib"], platform.python_version()
  digest = hashlib.sha256(VOCABULARY.encode())
  splits = {}
  for split, names in (("train", TRAIN_FILES), ("validation", VALIDATION_FILES)):
    texts = []
    for name in names:
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        raise ValueError(f"the corpus file {path} is missing from the standard library of Python "
                         f"{version}; use CPython 3.10-3.13 with its whole standard library "
                         "(some distributions package parts of it separately)")
      with open(path, encoding="utf-8") as f:
        texts.append(f.read())
      digest.update(f"\0{split}\0{name}\0{texts[-1]}".encode())
    splits[split] = encode("".join(texts))
  return Corpus(**splits, fingerprint=digest.hexdigest(), python_version=version)


def windows(ids: np.ndarray, length: int) -> np.ndarray:
  """`[N, length + 1]` windows of `ids` at stride `length`: window `i` is
  `ids[i * length:(i + 1) * length + 1]`, so inputs `w[:, :-1]` and targets `w[:, 1:]` cover
  every position once; the incomplete tail is dropped."""
  if length <= 0:
    raise ValueError(f"length must be > 0, got {length}")
  if len(ids) < length + 1:
    raise ValueError(f"{len(ids)} ids are too few for one window of length {length}; lower it")
  return np.lib.stride_tricks.sliding_window_view(ids, length + 1)[::length].copy()


def train_batches(windows: np.ndarray, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless training batches for steps `start_step, start_step + 1, ...` (module docstring).

  Args:
    windows: `[N, L + 1]` token windows (`windows(ids, L)`).
    batch_size: global batch size, divisible by `process_count`.
    seed: non-negative integer; fixes the epoch permutations.
    start_step: first step to yield (resume from a checkpoint at this step).
    process_index, process_count: this host and the number of hosts.
  Yields:
    `{"tokens": int32 [b, L + 1], "index": int32 [b] (window ids), "mask": float32 [b, L]
    (ones)}`, `b = batch_size // process_count`.
  """
  rows = host_rows(batch_size, process_index, process_count)
  steps = batch_indices(len(windows), batch_size=batch_size, seed=seed, start_step=start_step,
                        rows=rows)
  mask = np.ones((rows.stop - rows.start, windows.shape[1] - 1), np.float32)

  def batches():
    for _, indices in steps:
      yield {"tokens": windows[indices].astype(np.int32), "index": indices.astype(np.int32),
             "mask": mask.copy()}

  return batches()


def eval_batches(windows: np.ndarray, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """All windows once, in order; the last batch is padded with zero rows whose `mask` is 0.

  Args and yields as `train_batches`; every process yields
  `num_eval_batches(len(windows), batch_size)` batches.
  """
  rows = host_rows(batch_size, process_index, process_count)
  length = windows.shape[1] - 1

  def batches():
    for j in range(num_eval_batches(len(windows), batch_size)):
      indices = np.arange(j * batch_size, (j + 1) * batch_size)[rows]
      indices = indices[indices < len(windows)]
      batch = {"tokens": windows[indices].astype(np.int32), "index": indices.astype(np.int32),
               "mask": np.ones((len(indices), length), np.float32)}
      yield {name: pad_rows(x, rows.stop - rows.start) for name, x in batch.items()}

  return batches()
