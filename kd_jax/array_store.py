"""A directory of named numpy arrays, built atomically and resumably, checked on load.

It holds a teacher's cached outputs (e.g. top-k logits per token, or per-(example,
augmentation) logits), which cost a pass of the teacher over the data to compute::

  DIRECTORY/
    store.json        {"metadata": {...}, "arrays": {name: {"shape": [...], "dtype": "<f4"}}}
    <name>.npy        one array per name; all share their leading dimension (rows)

`build` writes into `DIRECTORY.partial/`, `chunk_rows` rows at a time; after each chunk is
flushed, `progress.json` (written atomically) records the rows done, so a killed build called
again with the same metadata resumes where it stopped. A partial directory started with other
metadata or arrays is an error (StaleStoreError), never mixed in or silently discarded: it may
hold hours of teacher inference. When every row is written the partial directory is renamed to
`DIRECTORY`, so `DIRECTORY` only ever holds a complete store.

Metadata is compared as `kd_jax.workdir.config_diff` compares configs (nested keys are dotted,
and the fields of `workdir.IGNORED_FIELDS`, such as `data.data_dir`, cannot make a store stale),
so a config section can be given as it is.

One writer: in a multi-host run only process 0 builds; the others wait for it (a barrier) and
then `open_store`.
"""
import hashlib
import json
import os
import re
from typing import Callable

import jax
import numpy as np
from numpy.typing import DTypeLike

from kd_jax import metrics, workdir
from kd_jax.checkpoint import atomic_write_json

STORE_FILE = "store.json"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"

ArraySpecs = dict[str, tuple[tuple[int, ...], DTypeLike]]


class StoreError(ValueError):
  """An array store is missing, incomplete or unreadable."""


class StaleStoreError(StoreError):
  """An array store (or a partial build) was made from other metadata or other arrays."""


def _specs_json(arrays: ArraySpecs) -> dict:
  """`{name: {"shape": [...], "dtype": "<f4"}}` of `(shape, dtype)` specs, checked."""
  if not arrays:
    raise ValueError("an array store needs at least one array")
  specs = {}
  for name, (shape, dtype) in arrays.items():
    if not re.fullmatch(r"\w[\w.-]*", name):
      raise ValueError(f"array name {name!r} is not a plain file name; use letters, digits, _ . -")
    dtype = np.dtype(dtype)
    if np.lib.format.descr_to_dtype(np.lib.format.dtype_to_descr(dtype)) != dtype:
      raise ValueError(f"array {name!r}: .npy files cannot store dtype {dtype}; use e.g. float16")
    specs[name] = {"shape": [int(n) for n in shape], "dtype": dtype.str}
  rows = {spec["shape"][0] if spec["shape"] else None for spec in specs.values()}
  if len(rows) != 1 or None in rows:
    raise ValueError(f"arrays must share their leading dimension (rows); got shapes "
                     f"{ {name: tuple(spec['shape']) for name, spec in specs.items()} }")
  return specs


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise StoreError(f"{path} cannot be read ({e}); delete its directory to rebuild it") from None


def _check_stored(path: str, what: str, fix: str, metadata: dict,
                  specs: dict | None) -> dict:
  """The stored array specs of `path`; raises StaleStoreError if metadata or specs differ."""
  stored = _read_json(os.path.join(path, STORE_FILE))
  diffs = workdir.config_diff(stored["metadata"], json.loads(json.dumps(metadata)))
  if specs is not None:
    diffs += workdir.config_diff({"arrays": stored["arrays"]}, {"arrays": specs})
  if diffs:
    listed = "\n".join(f"  {d}" for d in diffs)
    raise StaleStoreError(f"{what} {path} was made from other inputs. Differing keys (stored → "
                          f"expected):\n{listed}\n{fix}")
  return stored["arrays"]


def _open_arrays(path: str, specs: dict, mode: str) -> dict[str, np.ndarray]:
  """Memory maps of the `.npy` files of `path`, whose shapes and dtypes must be `specs`'."""
  arrays = {}
  for name, spec in specs.items():
    file = os.path.join(path, f"{name}.npy")
    try:
      array = np.load(file, mmap_mode=mode)
    except (OSError, ValueError) as e:
      raise StoreError(f"{file} cannot be read ({e}); delete {path} to rebuild it") from None
    if array.shape != tuple(spec["shape"]) or array.dtype != np.dtype(spec["dtype"]):
      raise StoreError(f"{file} holds {array.dtype}{list(array.shape)}, not the "
                       f"{np.dtype(spec['dtype'])}{spec['shape']} of {STORE_FILE}; delete {path} "
                       "to rebuild it")
    arrays[name] = array
  return arrays


def open_store(directory: str, metadata: dict,
               arrays: ArraySpecs | None = None) -> dict[str, np.ndarray]:
  """Read-only memory maps `{name: [rows, ...]}` of the complete store in `directory`.

  Args:
    directory: the store.
    metadata: JSON-serialisable dict that must equal the stored one.
    arrays: optional `{name: (shape, dtype)}` the stored arrays must have.
  Raises:
    StaleStoreError: the stored metadata or arrays differ (the message lists each key).
    StoreError: the store is missing, incomplete (an interrupted build) or unreadable.
  """
  if not os.path.isdir(directory):
    partial = directory + PARTIAL_SUFFIX
    progress = os.path.join(partial, PROGRESS_FILE)
    if os.path.exists(progress):
      raise StoreError(f"the array store {directory} is incomplete: its build stopped after "
                       f"{_read_json(progress)['rows_done']} rows ({partial}); build it again with "
                       "the same metadata to resume")
    raise StoreError(f"there is no array store at {directory}; build it first")
  stored = _check_stored(directory, "the array store", f"Delete {directory} to rebuild it.",
                         metadata, None if arrays is None else _specs_json(arrays))
  return _open_arrays(directory, stored, "r")


def build(directory: str, metadata: dict, arrays: ArraySpecs,
          fill: Callable[[int, int], dict[str, np.ndarray]], *, chunk_rows: int,
          progress: bool = False) -> dict[str, np.ndarray]:
  """Builds the store in `directory` (or resumes its build, or opens it if complete).

  Args:
    directory: where the complete store goes; nothing is created there until every row is
      written (the work happens in `directory + ".partial"`).
    metadata: JSON-serialisable dict of everything that determines the arrays' values (teacher
      checkpoint and data fingerprints, temperature, k, ...).
    arrays: `{name: (shape, dtype)}`; every shape starts with the same number of rows.
    fill: `fill(start, stop) -> {name: [stop - start, *shape[1:]]}` computes rows
      `[start, stop)` of every array; called once per chunk not yet written.
    chunk_rows: rows per `fill` call (and per progress record); may change between resumes.
    progress: show a progress bar over the rows.
  Returns:
    Read-only memory maps `{name: array}`, as `open_store`.
  Raises:
    StaleStoreError: `directory` or the partial build was made from other metadata or arrays.
  """
  specs = _specs_json(arrays)
  if os.path.isdir(directory):
    return open_store(directory, metadata, arrays)
  if chunk_rows <= 0:
    raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
  partial = directory + PARTIAL_SUFFIX
  os.makedirs(partial, exist_ok=True)
  if os.path.exists(os.path.join(partial, STORE_FILE)):
    _check_stored(partial, "the partial build", f"Delete {partial} to build afresh, or build "
                  "with the metadata it was started with.", metadata, specs)
  else:
    atomic_write_json(os.path.join(partial, STORE_FILE), {"metadata": metadata, "arrays": specs})
  progress_path = os.path.join(partial, PROGRESS_FILE)
  done = _read_json(progress_path)["rows_done"] if os.path.exists(progress_path) else 0
  if done:
    outputs = _open_arrays(partial, specs, "r+")
  else:  # No row was recorded: (re)create every file.
    outputs = {name: np.lib.format.open_memmap(os.path.join(partial, f"{name}.npy"), mode="w+",
                                               dtype=spec["dtype"], shape=tuple(spec["shape"]))
               for name, spec in specs.items()}
  rows = next(iter(specs.values()))["shape"][0]
  bar = metrics.progress_bar(rows, done, os.path.basename(directory)) if progress else None
  for start in range(done, rows, chunk_rows):
    stop = min(start + chunk_rows, rows)
    values = fill(start, stop)
    if set(values) != set(specs):
      raise ValueError(f"fill({start}, {stop}) returned arrays {sorted(values)}, expected "
                       f"{sorted(specs)}")
    for name, output in outputs.items():
      value = np.asarray(values[name])
      if value.shape != (stop - start, *output.shape[1:]):
        raise ValueError(f"fill({start}, {stop}) returned {name!r} of shape {value.shape}, "
                         f"expected {(stop - start, *output.shape[1:])}")
      np.copyto(output[start:stop], value, casting="same_kind")
      output.flush()
    atomic_write_json(progress_path, {"rows_done": stop})
    if bar is not None:
      bar.update(stop - start)
  if bar is not None:
    bar.close()
  os.rename(partial, directory)
  return open_store(directory, metadata, arrays)


def params_fingerprint(variables) -> str:
  """sha256 of a variables tree: every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()
