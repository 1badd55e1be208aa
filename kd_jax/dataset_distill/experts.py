"""Expert trajectories for trajectory matching: train K networks, keep their params every epoch.

MTT's buffer (Cazenavette et al., 2022): SGD lr 0.01, no momentum, batch 256, optional DSA,
params recorded before training and after each epoch. Stored as one float32 array
`trajectories.npy` `[experts, epochs + 1, P]` (memory-mappable with `np.load(mmap_mode="r")`)
and `buffer.json`, metadata sufficient to rebuild the apply function (model name and kwargs,
num_classes, image shape, kd_jax version) and to check what a run expects.

Writes are atomic (temporary name, then rename). Each finished expert is written to
`parts/expert_XXXXX.npy` first, so a killed run keeps finished experts and resumes from them;
when all are done, the parts are joined into `trajectories.npy` and removed.
"""
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kd_jax
from kd_jax import sharding
from kd_jax.checkpoint import atomic_write_json
from kd_jax.distiller import supervised, supervised_state
from kd_jax.step import make_train_step

TRAJECTORIES = "trajectories.npy"
METADATA = "buffer.json"
PARTS = "parts"


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
  """`np.save` to a temporary name in the same folder, then rename."""
  tmp = path.with_name(path.name + ".tmp.npy")
  np.save(tmp, np.asarray(array), allow_pickle=False)
  os.replace(tmp, path)


def check_metadata(found: dict, expected: dict, what: str) -> None:
  """Raises ValueError listing every key of `expected` whose value differs in `found`."""
  found = json.loads(json.dumps(found))
  expected = json.loads(json.dumps(expected))  # tuples → lists, as stored
  diffs = [f"{k}: file has {found.get(k, '<missing>')!r}, run expects {v!r}"
           for k, v in expected.items() if found.get(k) != v]
  if diffs:
    raise ValueError(f"{what} does not match this run:\n  " + "\n  ".join(diffs) +
                     "\nUse a different directory, or change the config to match the file.")


def epoch_batches(rng: np.random.Generator, num_examples: int, batch_size: int):
  """One shuffled epoch: yields (indices `[batch_size]`, mask `[batch_size]`); the last batch
  is padded with index 0 and mask 0 so every batch has the same shape."""
  perm = rng.permutation(num_examples)
  for start in range(0, num_examples, batch_size):
    idx = perm[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    mask[len(idx):] = 0.0
    yield np.pad(idx, (0, batch_size - len(idx))).astype(np.int32), mask


def make_indexed_train_step(apply_fn, tx: optax.GradientTransformation,
                            augment: Callable | None = None, method=None):
  """Returns `step(state, images, labels, indices, mask, key) -> state`, not jitted.

  The standard `kd_jax.step.make_train_step` of `method` (default: plain CE; labels may be
  class ids or probabilities) on the batch `augment(images[indices], key)`. Images stay on the device; only indices travel,
  and the batch is split over devices the way `indices` is.
  The caller draws a fresh `key` per step; under `jax.vmap` over networks pass one shared key
  so that DSA's family choice stays a real branch (a batched key turns `lax.switch` into
  computing every family).
  """
  train_step = make_train_step(method or supervised(apply_fn), tx)

  def step(state, images, labels, indices, mask, key):
    x = images[indices]
    if augment is not None:
      x = augment(x, key)
    batch = {"image": x, "label": labels[indices], "mask": mask}
    return train_step(state, batch, key)[0]

  return step


def train_expert(apply_fn, init_params: Callable, images: np.ndarray, labels: np.ndarray, *,
                 epochs: int, lr: float, batch_size: int, seed: int,
                 augment: Callable | None = None, mesh: Mesh | None = None,
                 rules: sharding.Rules = ()) -> np.ndarray:
  """Trains one expert; returns its trajectory `[epochs + 1, P]` float32.

  `init_params(rng) -> params` draws a fresh network; the model must have no mutable state.
  With a `mesh`, each batch is split over its `segment`, `data` and `fsdp` axes (those present)
  and the params are placed by `rules` (`kd_jax.sharding.state_shardings`; auto-FSDP on `fsdp`).
  """
  tx = optax.sgd(lr)
  step = jax.jit(make_indexed_train_step(apply_fn, tx, augment), donate_argnums=0)
  params = init_params(jax.random.key(seed))
  state = supervised_state({"params": params}, tx)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  place_batch = lambda x: x
  if mesh is not None:
    # Experts have no segments: a `segment` axis splits their batches too.
    axes = tuple(a for a in (sharding.SEGMENT_AXIS, *sharding.BATCH_AXES) if a in mesh.shape)
    sharding.check_batch_size(mesh, batch_size, "experts.batch_size", axes=axes)
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    images, labels = jax.device_put((images, labels), NamedSharding(mesh, PartitionSpec()))
    batch = NamedSharding(mesh, PartitionSpec(axes))
    place_batch = lambda x: jax.device_put(x, batch)  # the step's batch follows it
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 1)
  trajectory = [np.asarray(ravel_pytree(state.trainable["student"])[0], np.float32)]
  t = 0
  for _ in range(epochs):
    for idx, mask in epoch_batches(rng, images.shape[0], batch_size):
      state = step(state, images, labels, place_batch(idx), place_batch(mask),
                   jax.random.fold_in(key, t))
      t += 1
    trajectory.append(np.asarray(ravel_pytree(state.trainable["student"])[0], np.float32))
  return np.stack(trajectory)


def load_buffer(directory, expected: dict | None = None) -> tuple[np.ndarray, dict]:
  """Memory-maps a finished buffer; returns (trajectories `[K, E + 1, P]`, metadata).

  Raises ValueError naming every metadata field that differs from `expected`, and
  FileNotFoundError when the buffer is missing or unfinished.
  """
  directory = Path(directory)
  if not (directory / METADATA).exists() or not (directory / TRAJECTORIES).exists():
    raise FileNotFoundError(f"no finished expert buffer in {directory} (need {METADATA} and "
                            f"{TRAJECTORIES}); train it with train_experts(...)")
  metadata = json.loads((directory / METADATA).read_text())
  if expected is not None:
    check_metadata(metadata, expected, f"expert buffer {directory / METADATA}")
  trajectories = np.load(directory / TRAJECTORIES, mmap_mode="r", allow_pickle=False)
  want = (metadata["num_experts"], metadata["epochs"] + 1, metadata["num_params"])
  if trajectories.shape != want:
    raise ValueError(f"{directory / TRAJECTORIES} has shape {trajectories.shape}, its metadata "
                     f"says {want}; the buffer is corrupt, delete it and train again")
  return trajectories, metadata


def train_experts(directory, apply_fn, init_params: Callable, images: np.ndarray,
                  labels: np.ndarray, *, metadata: dict, num_experts: int, epochs: int,
                  lr: float = 0.01, batch_size: int = 256, seed: int = 0,
                  augment: Callable | None = None, mesh: Mesh | None = None,
                  rules: sharding.Rules = (), log: Callable = print
                  ) -> tuple[np.ndarray, dict]:
  """Trains (or resumes, or loads) a buffer of `num_experts` expert trajectories.

  Args:
    directory: where the buffer lives.
    metadata: what identifies the experts besides the training recipe, at least `model`,
      `model_kwargs`, `num_classes`, `image_shape` (and e.g. `dataset`, `zca`, `dsa`).
    mesh, rules: split each batch over this mesh, place params by rules (see `train_expert`).
    The rest: the recipe; expert k uses seed `seed + k`.
  Returns:
    `load_buffer(directory, ...)`. In a multi-process run every process trains and process 0
    writes; `directory` must be on a filesystem all processes share.
  """
  directory = Path(directory)
  num_params = int(ravel_pytree(init_params(jax.random.key(0)))[0].size)
  expected = {**metadata, "num_experts": num_experts, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "seed": seed, "num_params": num_params,
              "kd_jax_version": kd_jax.__version__}
  if (directory / TRAJECTORIES).exists():
    return load_buffer(directory, expected)
  writer = jax.process_index() == 0  # every process trains (the steps are collective)
  if writer:
    (directory / PARTS).mkdir(parents=True, exist_ok=True)
  if (directory / METADATA).exists():
    check_metadata(json.loads((directory / METADATA).read_text()), expected,
                   f"unfinished expert buffer {directory / METADATA}")
  elif writer:
    atomic_write_json(directory / METADATA, expected)
  parts = [directory / PARTS / f"expert_{k:05d}.npy" for k in range(num_experts)]
  todo = [k for k, part in enumerate(parts) if not part.exists()]
  sharding.barrier("kd_jax train_experts: resume point")  # decided before anything is written
  for k in todo:
    trajectory = train_expert(apply_fn, init_params, images, labels, epochs=epochs, lr=lr,
                              batch_size=batch_size, seed=seed + k, augment=augment, mesh=mesh,
                              rules=rules)
    if writer:
      atomic_save_npy(parts[k], trajectory)
    log(f"expert {k + 1}/{num_experts} done")
  sharding.barrier("kd_jax train_experts: experts written")
  if writer:
    atomic_save_npy(directory / TRAJECTORIES,
                    np.stack([np.load(p, allow_pickle=False) for p in parts]))
    for part in parts:
      part.unlink()
    (directory / PARTS).rmdir()
  sharding.barrier("kd_jax train_experts: buffer joined")
  return load_buffer(directory, expected)
