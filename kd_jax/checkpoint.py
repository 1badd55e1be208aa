"""The one module that talks to Orbax: atomic, periodic, keep-last-k checkpoints.

Every checkpoint holds the train state plus JSON metadata (model, classes, input
shape, kd_jax version). Restoring checks the metadata against what the run expects
and says what does not match. Orbax writes each step to a temporary directory and
renames it when complete, so a killed run never leaves a half-written latest step.
"""
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

import kd_jax

# Metadata fields that must match between a checkpoint and the run restoring it.
_MATCHED_FIELDS = ("model", "num_classes", "image_shape")


def atomic_write_json(path, data) -> None:
  """Writes `data` as JSON to a temporary name, then renames it over `path`."""
  path = os.fspath(path)
  with open(f"{path}.tmp", "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(f"{path}.tmp", path)


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not fit the run."""


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _check_metadata(found: dict, expected: dict, where: str, field_prefix: str):
  for key in _MATCHED_FIELDS:
    if key in expected and key in found and list(_listify(found[key])) != list(_listify(expected[key])):
      raise CheckpointError(
          f"checkpoint {where} was written for {key}={found[key]!r}, but this run expects "
          f"{key}={expected[key]!r}. Point {field_prefix} at a checkpoint of the right model, or "
          f"change the config to match the checkpoint.")


def _listify(value):
  return value if isinstance(value, (list, tuple)) else [value]


class Checkpointer:
  """Periodic, atomic, keep-last-k checkpoints of one training stage.

  Args:
    directory: where step directories live (created if missing).
    metadata: JSON-serialisable dict saved with every step and checked on restore,
      e.g. `{"model": "resnet8x4", "num_classes": 100, "image_shape": [32, 32, 3]}`.
    keep: how many most recent steps to keep.
  """

  def __init__(self, directory: str, metadata: dict, *, keep: int = 3):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.metadata = {**metadata, "kd_jax_version": kd_jax.__version__}
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Saves `state` at `step` (asynchronously; `wait()` blocks until committed)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.metadata)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, target, step: int | None = None):
    """Restores the state at `step` (default: latest) into the structure of `target`.

    Raises:
      CheckpointError: no checkpoint, metadata mismatch, or unreadable/corrupt files.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    where = f"{self.directory}/{step}"
    meta = _restore_meta(self._manager, step, where)
    _check_metadata(meta, self.metadata, where, "the workdir")
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target))))["state"]
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      raise CheckpointError(
          f"checkpoint {where} is corrupt or does not fit this run ({type(e).__name__}: "
          f"{_first_line(e)}). Delete {where} to resume from the previous step, or use a fresh "
          "workdir.") from e

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_meta(manager, step, where) -> dict:
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(f"checkpoint {where} has no readable kd_jax metadata "
                          f"({type(e).__name__}: {_first_line(e)}); it is corrupt or was not "
                          "written by kd_jax.") from e


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def restore_variables(path: str, expected: dict[str, Any], target_variables, *,
                      field: str = "teacher.checkpoint"):
  """Loads model variables `{"params", **model_state}` from a kd_jax stage checkpoint.

  Args:
    path: a stage's checkpoint directory (the latest step is used) or one step directory.
    expected: metadata that must match (`model`, `num_classes`, `image_shape`).
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
  _check_metadata(_restore_meta(manager, step, where), expected, where, field)
  try:
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    variables = {"params": raw["params"], **raw["model_state"]}
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
