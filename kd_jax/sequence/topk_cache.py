"""A language-model teacher's top-k logits per token, computed once and stored in the workdir.

Offline distillation reads the teacher's top-k logits, their vocabulary ids and its full
log-normaliser per token (`kd_jax.losses.teacher_topk`) instead of running the teacher at every
step, as MaxText's distillation does from stored top-k logits. The store is a
`kd_jax.array_store` (atomic, resumable): rows are the training windows, and its metadata names
the teacher's parameters (a sha256), the windows (corpus fingerprint, length, count), k and the
temperature, so a cache of another teacher or other data is an error, never used.
"""
import jax
from jax.experimental import multihost_utils
import numpy as np

from kd_jax import array_store, losses

TOPK_ARRAYS = ("teacher_topk_logits", "teacher_topk_indices", "teacher_logsumexp")


def topk_specs(rows: int, length: int, k: int) -> dict:
  """`{name: (shape, dtype)}` of the cache of `rows` windows of `length` tokens."""
  return {"teacher_topk_logits": ((rows, length, k), np.float32),
          "teacher_topk_indices": ((rows, length, k), np.int32),
          "teacher_logsumexp": ((rows, length), np.float32)}


def build_topk_cache(directory: str, apply_fn, variables, windows: np.ndarray, *, k: int,
                     temperature: float, batch_size: int, data_fingerprint: str) -> dict:
  """The teacher's top-k outputs for every window: `{"teacher_topk_logits" [N, L, k] float32,
  "teacher_topk_indices" [N, L, k] int32, "teacher_logsumexp" [N, L] float32}` (read-only memory
  maps), built in `directory` or opened if it holds this teacher's cache of these windows.

  Args:
    directory: the store (e.g. `<workdir>/teacher_topk`).
    apply_fn, variables: the teacher (`kd_jax` apply-function contract).
    windows: `[N, L + 1]` token windows; the teacher reads `windows[:, :-1]`.
    k: logits kept per token.
    temperature: the distillation temperature (the stored log-normaliser is of logits / T).
    batch_size: windows per teacher pass (and per resumable chunk).
    data_fingerprint: names the text the windows come from.
  Raises:
    kd_jax.array_store.StaleStoreError: `directory` holds another teacher's or data's cache.
  """
  rows, length = windows.shape[0], windows.shape[1] - 1
  metadata = {"teacher": array_store.params_fingerprint(variables), "data": data_fingerprint,
              "windows": rows, "length": length, "k": k, "temperature": temperature}
  specs = topk_specs(rows, length, k)

  @jax.jit
  def topk(tokens):
    logits = apply_fn(variables, tokens, train=False)[0].logits
    return dict(zip(TOPK_ARRAYS, losses.teacher_topk(logits, k, temperature=temperature)))

  def fill(start, stop):
    return jax.device_get(topk(windows[start:stop, :-1]))

  if jax.process_index() == 0:
    array_store.build(directory, metadata, specs, fill, chunk_rows=batch_size, progress=True)
  multihost_utils.sync_global_devices("kd_jax.sequence.topk_cache")
  return array_store.open_store(directory, metadata, specs)


def with_topk(batches, cache: dict):
  """`start -> iterator` of batches with each row's cached top-k arrays added (by `index`)."""

  def add(batch):
    return {**batch, **{name: np.asarray(cache[name][batch["index"]]) for name in TOPK_ARRAYS}}

  return lambda start: map(add, batches(start))
