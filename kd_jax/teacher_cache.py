"""A teacher's logits for every step and row of a training run, computed once and stored.

FKD-style caching (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022; FerKD, Shen et al., ICCV 2023): the KD step reads the teacher's logits
instead of running the teacher, which takes its forward pass (two thirds of the step's FLOPs for
resnet32x4 → resnet8x4) out of every step (`Distiller(..., cached=("teacher",))`).

A training batch is a function of (seed, step) (`kd_jax.data.train_batches`: the examples from
the epoch's permutation, the augmentation draws from (seed, step)), so the cache is keyed by the
step and the row, and replaying the pipeline replays each cached (example, augmentation) pair.
For `S` steps of `b` rows (this process's rows of each global batch) the store holds:

  logits        [S, b, C]  float32 or float16             storage "float32" / "float16"
  topk_logits   [S, b, k]  float32                        storage "top<k>": the teacher's k
  topk_indices  [S, b, k]  int32                            largest logits, their classes and
  logsumexp     [S, b]     float32                          its log-normaliser (T = 1)
  index         [S, b]     int32     each row's example
  digest        [S, b]     uint64    a hash of each row's augmented, normalised image

It is a `kd_jax.array_store` (written atomically, resumable) whose metadata (the teacher's
parameter hash, what the caller says the batches come from: data, seed, batch size,
augmentation, and the storage) must match on load: a cache of another teacher, other data or
other augmentation is a `StaleStoreError` naming the differing fields. On read, each batch's
examples and image hashes must equal the stored ones, so a batch that is not the cached one
(e.g. after a change to the augmentation code) is an error too, never distilled from.

Top-k storage rebuilds dense logits on read: the k stored logits exactly, and for the other
C − k classes equal shares of the teacher's remaining probability mass at T = 1 (FKD's marginal
smoothing). Terms comparing distributions see the teacher's top-k probabilities exactly at T = 1
and their ratios at any T; a term on raw logits (`logit_mse`) wants full storage.
"""
import hashlib
import itertools
import os
import re

import jax
from jax.experimental import multihost_utils
import numpy as np

from kd_jax import array_store, losses
from kd_jax.distiller import cached_logits_key


def cache_specs(storage: str, num_steps: int, rows: int, num_classes: int) -> dict:
  """`{name: (shape, dtype)}` of a cache of `num_steps` steps of `rows` rows (see the module
  docstring); a bad `storage` is a ValueError naming `teacher.cache`."""
  top = re.fullmatch(r"top(\d+)", storage)
  if storage in ("float32", "float16"):
    outputs = {"logits": ((num_steps, rows, num_classes), storage)}
  elif top and 1 <= int(top.group(1)) <= num_classes:
    k = int(top.group(1))
    outputs = {"topk_logits": ((num_steps, rows, k), np.float32),
               "topk_indices": ((num_steps, rows, k), np.int32),
               "logsumexp": ((num_steps, rows), np.float32)}
  else:
    raise ValueError(f"teacher.cache={storage!r} is unknown; use '' (no cache), 'float32', "
                     f"'float16' or 'top<k>' (e.g. 'top10') with k at most the {num_classes} "
                     "classes")
  return {**outputs, "index": ((num_steps, rows), np.int32),
          "digest": ((num_steps, rows), np.uint64)}


def _digests(images: np.ndarray) -> np.ndarray:
  """`[b]` uint64: the first 8 bytes of each row's blake2b."""
  return np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).tobytes(),
                                                  digest_size=8).digest(), "little")
                   for x in images], np.uint64)


def _host_variables(variables):
  """The variables as host arrays on every process (gathered where sharded over processes)."""
  return jax.tree.map(
      lambda x: (multihost_utils.process_allgather(x, tiled=True)
                 if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)),
      variables)


def dense_logits(topk_logits: np.ndarray, topk_indices: np.ndarray, logsumexp: np.ndarray,
                 num_classes: int) -> np.ndarray:
  """`[..., C]` float32 logits from top-k storage: the k logits, and the teacher's remaining
  probability mass at T = 1 shared equally by the other classes (FKD's marginal smoothing)."""
  k = topk_logits.shape[-1]
  top_mass = np.exp(topk_logits - logsumexp[..., None]).sum(-1)
  share = np.maximum(1.0 - top_mass, np.finfo(np.float32).tiny) / max(num_classes - k, 1)
  out = np.repeat((logsumexp + np.log(share))[..., None], num_classes, -1).astype(np.float32)
  np.put_along_axis(out, topk_indices, topk_logits, -1)
  return out


class TeacherCache:
  """An opened cache: `arrays` (read-only memory maps, see the module docstring)."""

  def __init__(self, arrays: dict[str, np.ndarray], num_classes: int):
    self.arrays, self.num_classes = arrays, num_classes
    self.directory = os.path.dirname(arrays["index"].filename)

  @property
  def num_steps(self) -> int:
    return self.arrays["index"].shape[0]

  def logits(self, step: int, batch: dict) -> np.ndarray:
    """`[b, C]` float32 teacher logits of step `step`, whose batch must be `batch`."""
    if step >= self.num_steps:
      raise array_store.StoreError(f"step {step} is beyond the {self.num_steps} steps of the "
                                   f"teacher cache {self.directory}")
    if not (np.array_equal(self.arrays["index"][step], batch["index"])
            and np.array_equal(self.arrays["digest"][step], _digests(batch["image"]))):
      raise array_store.StaleStoreError(
          f"step {step}'s batch is not the one in the teacher cache {self.directory} (other "
          "examples, augmentation or normalisation); delete it to rebuild it")
    if "logits" in self.arrays:
      return self.arrays["logits"][step].astype(np.float32)
    return dense_logits(*(self.arrays[name][step] for name in
                          ("topk_logits", "topk_indices", "logsumexp")), self.num_classes)


def build(directory: str, batches, apply_fn, variables, *, num_steps: int, storage: str,
          metadata: dict, chunk_steps: int = 50) -> TeacherCache:
  """The teacher's outputs on the first `num_steps` batches of `batches`, built in `directory`
  (or resumed, or opened when complete). Every process calls it; each stores its own rows (in
  `directory.process<i>` when there are several).

  Args:
    directory: the store.
    batches: `start -> iterator` of this process's training batches (`image` [b, H, W, C],
      `index` [b]): the ones the cache will be read with.
    apply_fn, variables: the teacher (`kd_jax` apply-function contract), run in eval mode.
    num_steps: the steps cached; a stage may read a prefix.
    storage: see `cache_specs`.
    metadata: JSON-serialisable dict of what the batches come from (data, seed, batch size,
      augmentation) and what the teacher is (model, precision); its parameters are hashed here.
    chunk_steps: steps per progress record (the unit of resumption).
  Raises:
    kd_jax.array_store.StaleStoreError: `directory` holds a cache of other metadata.
  """
  if jax.process_count() > 1:
    directory = f"{directory}.process{jax.process_index()}"
  variables = _host_variables(variables)
  first = next(batches(0))
  num_classes = jax.eval_shape(lambda x: apply_fn(variables, x, train=False)[0].logits,
                               first["image"]).shape[-1]
  specs = cache_specs(storage, num_steps, len(first["index"]), num_classes)
  metadata = {**metadata, "teacher_params": array_store.params_fingerprint(variables), "storage": storage,
              "num_steps": num_steps, "process": [jax.process_index(), jax.process_count()]}
  names = [name for name in specs if name not in ("index", "digest")]
  device_variables = jax.device_put(variables)

  @jax.jit
  def outputs(variables, images):
    logits = apply_fn(variables, images, train=False)[0].logits
    if "logits" in specs:
      return [logits]
    return list(losses.teacher_topk(logits, specs["topk_logits"][0][-1]))

  def fill(start, stop):
    steps = [dict(zip(names, jax.device_get(outputs(device_variables, b["image"]))),
                  index=b["index"], digest=_digests(b["image"]))
             for b in itertools.islice(batches(start), stop - start)]
    return {name: np.stack([s[name] for s in steps]) for name in specs}

  arrays = array_store.build(directory, metadata, specs, fill, chunk_rows=chunk_steps,
                             progress=jax.process_index() == 0)
  return TeacherCache(arrays, num_classes)


def with_teacher_logits(batches, cache: TeacherCache, teacher_name: str = "teacher"):
  """`start -> iterator` of `batches` with each step's cached logits as
  `batch[cached_logits_key(teacher_name)]` `[b, C]` float32, checked against the stored rows."""
  key = cached_logits_key(teacher_name)
  return lambda start: ({**batch, key: cache.logits(step, batch)}
                        for step, batch in enumerate(batches(start), start))


def with_placeholder(batches, storage: str, num_classes: int, teacher_name: str = "teacher"):
  """`batches` with zero teacher logits, for start-up checks before the cache exists
  (`kd_jax.trainer.check_stage`); a bad `storage` fails here."""
  cache_specs(storage, 1, 1, num_classes)
  key = cached_logits_key(teacher_name)
  return lambda start: ({**batch, key: np.zeros((len(batch["index"]), num_classes), np.float32)}
                        for batch in batches(start))
