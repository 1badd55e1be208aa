"""The one module that talks to Orbax: atomic, periodic, keep-last-k checkpoints.

Every checkpoint holds the train state plus JSON metadata: everything that determines the
state's shapes (model, model kwargs, classes, input shape, and whatever the caller adds) and
the kd_jax version. Restoring compares the whole metadata (except version fields) and the
stored array shapes with the run's, and says what differs. Orbax writes each step to a
temporary directory and renames it when complete, so a killed run never leaves a
half-written latest step. `Checkpointer.restore_latest` falls back past steps whose files
cannot be read, moving them to `<directory>/corrupt/` (nothing is ever deleted).
"""
import contextlib
import json
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

import kd_jax

CORRUPT_DIR = "corrupt"


def atomic_write(path, data: bytes) -> None:
  """Writes `data` to a temporary name, syncs it, then renames it over `path`: readers and
  a kill at any moment see the old file or the new one, never a part."""
  path = os.fspath(path)
  with open(f"{path}.tmp", "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(f"{path}.tmp", path)


def atomic_write_json(path, data) -> None:
  """`atomic_write` of `data` as indented JSON with sorted keys."""
  atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())


class CheckpointError(ValueError):
  """A checkpoint is missing, or does not fit the run."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read (truncated, deleted or garbled)."""


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _json(value):
  """`value` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value))


def _differences(found: dict, expected: dict, keys) -> list[str]:
  """`"key=found (this run: expected)"` for each of `keys` whose values differ."""
  missing = "(missing)"
  return [f"{k}={found.get(k, missing)!r} (this run: {expected.get(k, missing)!r})"
          for k in keys if found.get(k, missing) != expected.get(k, missing)]


def _metadata_diff(found: dict, expected: dict, keys=None) -> list[str]:
  """Differences between checkpoint metadata `found` and the run's `expected`, on `keys`
  (default: every key of either but the `*version` ones)."""
  found, expected = _json(found), _json(expected)
  if keys is None:
    keys = sorted(k for k in {*found, *expected} if not k.endswith("version"))
  return _differences(found, expected, keys)


def _leaf_name(path) -> str:
  """A pytree path as Orbax names the array (`opt_state.0.mu.w`)."""
  return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _shape_diff(stored: dict[str, tuple], target) -> list[str]:
  """Arrays whose stored shape (`{orbax name: shape}`) differs from `target`'s, or that only
  one side has."""
  wanted = {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  return _differences(stored, wanted, sorted({*stored, *wanted}))


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _summary(diffs: list[str], limit: int = 5) -> str:
  more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return "; ".join(diffs[:limit]) + more


@contextlib.contextmanager
def naming_os_errors(path: str):
  """Re-raises an OSError that names no file (a failed write or flush) as one naming `path`,
  and TensorStore's reports of operating-system errors (a ValueError whose text has
  `os_error_code='28'`) as the OSError they are, naming the failing file."""
  try:
    yield
  except OSError as e:
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror, path) from e
  except ValueError as e:
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code is None:
      raise
    file = re.search(r'local file "([^"]+)"', str(e))
    raise OSError(int(code[1]), os.strerror(int(code[1])), file[1] if file else path) from e


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Periodic, atomic, keep-last-k checkpoints of one training stage.

  Args:
    directory: where step directories live (created if missing).
    metadata: JSON-serialisable dict saved with every step and compared on restore: all
      that determines the state's shapes, e.g. `{"model": "resnet8x4", "model_kwargs": {},
      "num_classes": 100, "image_shape": [32, 32, 3], "adapters": [...]}`.
    keep: how many most recent steps to keep.
  """

  def __init__(self, directory: str, metadata: dict, *, keep: int = 3):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.metadata = {**metadata, "kd_jax_version": kd_jax.__version__}
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Saves `state` at `step` (asynchronously; `wait()` blocks until committed).

    Raises:
      OSError: this or the previous save failed to write (e.g. ENOSPC); the steps saved
        before it are intact.
    """
    with naming_os_errors(self.directory):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.metadata)))

  def wait(self) -> None:
    with naming_os_errors(self.directory):
      self._manager.wait_until_finished()

  def restore(self, target, step: int | None = None):
    """Restores the state at `step` (default: latest) into the structure of `target`.

    Raises:
      CorruptCheckpointError: the step's files cannot be read.
      CheckpointError: no checkpoint, or its metadata or array shapes differ from the run's.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    where = f"{self.directory}/{step}"
    diffs = _metadata_diff(_restore_meta(self._manager, step, where), self.metadata)
    if not diffs:
      diffs = _shape_diff(self._stored_shapes(step, where), target)
    if diffs:
      raise CheckpointError(
          f"the checkpoints in {self.directory} were written for another model or config: "
          f"{_summary(diffs)}. Rerun with the config that made them, or "
          "use a fresh --workdir.")
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target))))["state"]
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CorruptCheckpointError(
          f"checkpoint {where} is corrupt ({type(e).__name__}: {_first_line(e)})") from e

  def restore_latest(self, target, *, start_over: bool = False):
    """Restores the newest readable step into the structure of `target`.

    A step whose files cannot be read is reported in one printed line and moved to
    `<directory>/corrupt/<step>-<time>`; the next older step is tried.

    Args:
      target: a state of the configured model (shapes and shardings to restore into).
      start_over: when no step is readable, start from scratch instead of raising.
    Returns:
      `(state, step)`, or `(None, None)` when there is no checkpoint to resume from.
    Raises:
      CheckpointError: the checkpoints do not fit the run (metadata or shapes differ; nothing
        is moved), or every step was corrupt and `start_over` is False.
    """
    moved = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(target, step), step
      except CorruptCheckpointError as e:
        moved.append(self._move_aside(step))
        print(f"{e}; moved it to {moved[-1]} and trying the previous step", flush=True)
    if moved and not start_over:
      raise CheckpointError(
          f"no readable checkpoint is left in {self.directory} (the corrupt ones are in "
          f"{os.path.dirname(moved[0])}). Rerun to train this stage from scratch, or use a "
          "fresh --workdir.")
    return None, None

  def _stored_shapes(self, step: int, where: str) -> dict[str, tuple]:
    try:
      tree = self._manager.item_metadata(step)["state"].tree
      return {m.name: tuple(m.shape) for m in jax.tree.leaves(tree)}
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CorruptCheckpointError(
          f"checkpoint {where} is corrupt: its array metadata cannot be read "
          f"({type(e).__name__}: {_first_line(e)})") from e

  def _move_aside(self, step: int) -> str:
    destination = os.path.join(self.directory, CORRUPT_DIR,
                               f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:  # one process moves it; all see the move after the barrier
      os.makedirs(os.path.dirname(destination), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), destination)
    ocp.multihost.sync_global_processes(f"kd_jax_move_aside_{step}")
    self._manager.reload()
    return destination

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def _restore_meta(manager, step, where) -> dict:
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CorruptCheckpointError(f"checkpoint {where} is corrupt: its kd_jax metadata cannot be "
                                 f"read ({type(e).__name__}: {_first_line(e)})") from e


def restore_variables(path: str, expected: dict[str, Any], target_variables, *,
                      field: str = "teacher.checkpoint"):
  """Loads model variables `{"params", **model_state}` from a kd_jax stage checkpoint.

  Args:
    path: a stage's checkpoint directory (the latest step is used) or one step directory.
    expected: metadata that must match (the keys given, e.g. `model`, `num_classes`).
    target_variables: variables of the expected model (shapes are checked against it).
    field: config field named in errors.
  """
  path = os.path.abspath(os.path.expanduser(path))
  step = None
  if os.path.basename(path).isdigit():
    path, step = os.path.dirname(path), int(os.path.basename(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{field}={path!r} does not exist; give the checkpoint directory of a "
                          "trained stage, e.g. WORKDIR/teacher/checkpoints")
  manager = ocp.CheckpointManager(path)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{field}={path!r} holds no complete checkpoint")
  where = f"{path}/{step}"
  diffs = _metadata_diff(_restore_meta(manager, step, where), expected,
                        [k for k in expected if not k.endswith("version")])
  if diffs:
    raise CheckpointError(f"checkpoint {where} does not fit the configured model: "
                          f"{_summary(diffs)}. Point {field} at a checkpoint of the right model, "
                          "or change the config to match the checkpoint.")
  try:
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    # The student of a stage's `kd_jax.step.TrainState`.
    variables = {"params": raw["trainable"]["student"], **raw["extra"]["model_state"]["student"]}
    target_shapes = jax.tree.map(lambda x: tuple(x.shape), target_variables)
    found_shapes = jax.tree.map(lambda x: tuple(x.shape), variables)
    if target_shapes != found_shapes:
      raise ValueError("parameter shapes differ from the configured model")
  except Exception as e:
    raise CheckpointError(f"checkpoint {where} is corrupt or incompatible with the configured "
                          f"model ({type(e).__name__}: {_first_line(e)}); check {field}") from e
  finally:
    manager.close()
  return jax.tree.map(lambda t, x: jax.numpy.asarray(x, t.dtype), target_variables, variables)
