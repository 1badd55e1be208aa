"""Deterministic, resumable, host-sharded numpy batches `{"image", "label", "mask"}` from a random-access source.

Training step `s` with global batch `B` over `N` examples reads, with `e, k = divmod(s, N // B)`, the examples
`perm_e[k * B:(k + 1) * B]`, where `perm_e` is a permutation drawn from `(seed, e)`; the remainder of each epoch is
dropped. Augmentation draws for the whole global batch come from `(seed, s)`. So a batch depends only on
`(seed, s)`: a run restarted at step `s` sees exactly the batches of an uninterrupted run, and process `i` of `n`
receives rows `[i * B / n, (i + 1) * B / n)` of the same global batch.

Evaluation yields every example once, in order; the last batch is zero-padded with `mask = 0`, never dropped, and
all processes yield the same number of batches.
"""
import itertools
import math
import queue
import threading
from typing import Iterator

import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data.sources import gather

_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps per epoch (remainder dropped)."""
  return num_examples // batch_size


def host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch of `batch_size` (checked)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size}.")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got process_index={process_index}, "
                     f"process_count={process_count}.")
  if batch_size % process_count:
    raise ValueError(f"The global batch_size={batch_size} must be divisible by process_count={process_count}.")
  per_host = batch_size // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, counter])


def _finish(images, labels, mask, mean, std) -> dict[str, np.ndarray]:
  labels = labels.astype(np.int32 if np.issubdtype(labels.dtype, np.integer) else np.float32)
  return {"image": augment_lib.normalize(images, mean, std), "label": labels, "mask": mask}


def batch_indices(num_examples: int, *, batch_size: int, seed: int, start_step: int,
                  rows: slice) -> Iterator[tuple[int, np.ndarray]]:
  """`(step, indices)` for steps `start_step, start_step + 1, ...`: this host's `rows` of the
  global batch `perm_e[k * B:(k + 1) * B]` (module docstring). Arguments are checked now, not at
  the first `next`."""
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  steps = steps_per_epoch(num_examples, batch_size)
  if steps == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the {num_examples} examples; lower it.")

  def indices():
    epoch, permutation = None, None
    for step in itertools.count(start_step):
      if step // steps != epoch:
        epoch = step // steps
        permutation = _rng(seed, _PERMUTATION_STREAM, epoch).permutation(num_examples)
      k = step % steps
      yield step, permutation[k * batch_size:(k + 1) * batch_size][rows]

  return indices()


def train_batches(source, *, batch_size: int, seed: int, start_step: int = 0,
                  augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig(), mean=None, std=None,
                  process_index: int = 0, process_count: int = 1, prefetch: int = 2) -> Iterator[dict]:
  """Endless training batches for steps `start_step, start_step + 1, ...` (see the module docstring).

  Args:
    source: random-access source (`open_source`, `ArrayDataSource`).
    batch_size: global batch size, divisible by `process_count`.
    seed: non-negative integer; fixes the epoch permutations and the augmentation draws.
    start_step: first step to yield (resume from a checkpoint at this step).
    augment: crop/flip augmentation, applied before normalisation.
    mean, std: per-channel normalisation of [0, 1] pixels (`DatasetInfo.mean/std`); `None` skips it.
    process_index, process_count: this host and the number of hosts (`jax.process_index()/process_count()`).
    prefetch: batches prepared ahead in a background thread; 0 prepares them in the caller.
  Yields:
    `{"image": float32 [b, H, W, C], "label": int32 [b] (or float32 [b, K] soft labels), "mask": float32 [b],
    "index": int32 [b]}`, `b = batch_size // process_count`; the mask is all ones and `index` holds the rows'
    positions in `source` (CRD's memory bank needs them).
  """
  rows = host_rows(batch_size, process_index, process_count)
  steps = batch_indices(len(source), batch_size=batch_size, seed=seed, start_step=start_step,
                        rows=rows)

  def batches():
    for step, indices in steps:
      draws = augment_lib.sample_augment(augment, batch_size, _rng(seed, _AUGMENT_STREAM, step))
      images, labels = gather(source, indices)
      images = augment_lib.apply_augment(images, {name: d[rows] for name, d in draws.items()}, augment)
      batch = _finish(images, labels, np.ones(len(indices), np.float32), mean, std)
      yield {**batch, "index": np.asarray(indices, np.int32)}

  return _prefetch(batches(), prefetch)


def pad_rows(x: np.ndarray, num_rows: int) -> np.ndarray:
  """`x` zero-padded to `num_rows` rows."""
  return np.pad(x, [(0, num_rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches `eval_batches` yields: every example once, the last batch padded."""
  return math.ceil(num_examples / batch_size)


def eval_batches(source, *, batch_size: int, mean=None, std=None, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2) -> Iterator[dict]:
  """All examples once, in order, without augmentation; padding rows are zeros with `mask = 0`.

  Args and yields as `train_batches`; every process yields `num_eval_batches(len(source), batch_size)` batches.
  """
  rows = host_rows(batch_size, process_index, process_count)
  num_examples, per_host = len(source), rows.stop - rows.start

  def batches():
    for j in range(num_eval_batches(num_examples, batch_size)):
      indices = np.arange(j * batch_size, (j + 1) * batch_size)[rows]
      valid = indices[indices < num_examples]
      images, labels = gather(source, valid if valid.size else [0])  # An empty slice still needs the shapes.
      batch = _finish(images[:valid.size], labels[:valid.size], np.ones(valid.size, np.float32), mean, std)
      yield {name: pad_rows(x, per_host) for name, x in batch.items()}

  return _prefetch(batches(), prefetch)


class _Raised:

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _prefetch(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` in a daemon thread, `size` items ahead; errors are re-raised in the consumer."""
  if size < 0:
    raise ValueError(f"prefetch must be >= 0, got {size}.")
  if size == 0:
    return iterator
  return _prefetch_thread(iterator, size)


def _prefetch_thread(iterator: Iterator, size: int) -> Iterator:
  items, stop = queue.Queue(maxsize=size), threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Raised(e))

  threading.Thread(target=work, daemon=True).start()
  try:
    while (item := items.get()) is not _END:
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
