"""Device mesh, parameter/batch shardings and multi-host start-up (docs/design.md, "Sharding").

Everything runs under plain `jax.jit` with `NamedSharding` objects; there is no pmap.

* The mesh comes from a config list such as `[("data", -1)]` (pure data parallel) or
  `[("data", -1), ("fsdp", 2)]` (FSDP: params sharded over `fsdp`, batch over both).
* Parameters are placed by a regex table `[(regex, spec), ...]`, matched with `re.search`
  against the "/"-joined path of each leaf (`"stage1/block0/conv1/kernel"`); the first
  match wins and `spec` is a `PartitionSpec` tuple (`()` = replicated). Leaves no rule
  matches are FSDP-sharded automatically when the mesh has an `fsdp` axis (largest
  dimension divisible by its size, for leaves of at least `fsdp_min_size` elements) and
  replicated otherwise. Teacher variables use the same table.
* Optimizer state follows its parameter: a leaf of `opt_state` whose path ends with a
  parameter's path (and has its shape) gets that parameter's sharding.
* Batches are sharded on their leading dimension over `data` and `fsdp` together.
* On CPU, `use_host_cores` splits the host into one XLA device per core before JAX starts, so
  the `data` axis spreads each batch over all cores (XLA:CPU runs one device's convolutions on
  few threads; see `benchmarks/RESULTS.md`, "KD-step throughput").
* Trajectory matching may add a `segment` axis: several (expert, start epoch) segments per
  iteration, one per device group (`kd_jax.dataset_distill.matching`).
"""
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
Rules = Sequence[tuple[str, tuple]]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
SEGMENT_AXIS = "segment"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_FSDP_MIN_SIZE = 2**14  # elements; smaller leaves stay replicated


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `Mesh` from `[(name, size), ...]`; one size may be -1 (= the remaining devices).

  Args:
    axes: config `mesh.axes`, e.g. `[("data", -1)]` or `[("data", -1), ("fsdp", 2)]`.
    devices: defaults to `jax.devices()` (all processes' devices).
  Returns:
    A mesh whose axis sizes multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = [tuple(a) for a in axes]
  if not axes or any(len(a) != 2 or not isinstance(a[0], str) or not isinstance(a[1], int)
                     for a in axes):
    raise ValueError(f"mesh.axes must be a non-empty list of (name, size) pairs, got {axes}")
  names = [name for name, _ in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh.axes has repeated axis names: {names}")
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh.axes sizes must be positive, with at most one -1, got {axes}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if len(devices) % fixed:
    raise ValueError(f"mesh.axes {axes}: the fixed sizes multiply to {fixed}, which does not "
                     f"divide the {len(devices)} devices; choose sizes that divide {len(devices)}")
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh.axes {axes} covers {int(np.prod(sizes))} devices but there are "
                     f"{len(devices)}; use -1 for one axis to take the rest")
  return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path)


def _shape(leaf) -> tuple:
  return tuple(getattr(leaf, "shape", ()))


def axis_size(mesh: Mesh, entry) -> int:
  """Number of devices along `entry`: an axis name, a tuple of names, or None (1)."""
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names if n is not None]))


def _check_rule(mesh: Mesh, regex: str, spec: tuple, path: str, shape: tuple) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"mesh.rules entry ({regex!r}, {spec}) has {len(spec)} dimensions but "
                     f"parameter {path!r} has shape {shape}")
  for dim, entry in zip(shape, spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    unknown = [n for n in names if n is not None and n not in mesh.shape]
    if unknown:
      raise ValueError(f"mesh.rules entry ({regex!r}, {spec}) names axes {unknown} that are not "
                       f"in the mesh {dict(mesh.shape)}")
    if dim % axis_size(mesh, entry):
      raise ValueError(f"mesh.rules entry ({regex!r}, {spec}) splits a dimension of {dim} of "
                       f"parameter {path!r} (shape {shape}) into {axis_size(mesh, entry)} "
                       "parts, which does not divide it; change the rule or the mesh")


def _fsdp_spec(mesh: Mesh, shape: tuple, min_size: int) -> PartitionSpec:
  """Shards the largest dimension divisible by the fsdp axis size; else replicated."""
  size = mesh.shape.get(FSDP_AXIS, 1)
  if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      return PartitionSpec(*([None] * dim + [FSDP_AXIS]))
  return PartitionSpec()


def param_shardings(params: PyTree, mesh: Mesh, rules: Rules = (), *,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PyTree:
  """A tree of `NamedSharding` objects for `params` (arrays or `jax.ShapeDtypeStruct` leaves).

  Args:
    params: any tree of arrays: student params, teacher variables, model state.
    mesh: from `make_mesh`.
    rules: config `mesh.rules`, `[(regex, spec_tuple), ...]`; first `re.search` match on
      the "/"-joined leaf path wins.
    fsdp_min_size: leaves with fewer elements are never auto-sharded.
  """
  compiled = [(re.compile(regex), regex, tuple(spec)) for regex, spec in rules]

  def one(path, leaf):
    name, shape = _path_str(path), _shape(leaf)
    for pattern, regex, spec in compiled:
      if pattern.search(name):
        _check_rule(mesh, regex, spec, name, shape)
        return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, _fsdp_spec(mesh, shape, fsdp_min_size))

  return jax.tree_util.tree_map_with_path(one, params)


def _follow_params(tree: PyTree, by_path: dict[tuple, NamedSharding], mesh: Mesh) -> PyTree:
  """Gives each leaf the sharding of the parameter whose path its own path ends with."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == _shape(leaf):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state, mesh: Mesh, rules: Rules = (), *,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """Shardings for a `kd_jax.step.TrainState` (arrays or `jax.eval_shape` output).

  Trainable and frozen networks and the loss state follow `rules` (then auto-FSDP); every
  optimizer state leaf follows the parameter it belongs to; the step counter is replicated.
  """
  trainable_sh = param_shardings(state.trainable, mesh, rules, fsdp_min_size=fsdp_min_size)
  by_path = {tuple(_key_str(k) for k in path): (_shape(leaf), sharding)
             for (path, leaf), sharding in zip(
                 jax.tree_util.tree_flatten_with_path(state.trainable)[0],
                 jax.tree.leaves(trainable_sh))}
  return state.replace(
      step=NamedSharding(mesh, PartitionSpec()),
      trainable=trainable_sh,
      frozen=param_shardings(state.frozen, mesh, rules, fsdp_min_size=fsdp_min_size),
      extra=param_shardings(state.extra, mesh, rules, fsdp_min_size=fsdp_min_size),
      opt_state=_follow_params(state.opt_state, by_path, mesh))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch dimension is split over: `data` and `fsdp`, those present."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the mesh's `data` and `fsdp` axes."""
  axes = batch_axes(mesh)
  if not axes:
    raise ValueError(f"mesh.axes must include {DATA_AXIS!r} (and optionally {FSDP_AXIS!r}) to "
                     f"shard batches, got axes {mesh.axis_names}")
  return NamedSharding(mesh, PartitionSpec(axes))


def check_batch_size(mesh: Mesh, batch_size: int, field: str, hint: str = "",
                     axes: tuple[str, ...] | None = None) -> None:
  """Raises ValueError naming config `field` unless `batch_size` splits evenly over `axes`
  (default: the mesh's batch axes `data`, `fsdp`); `hint` is appended to the message."""
  axes = batch_axes(mesh) if axes is None else axes
  shards = axis_size(mesh, axes or None)
  if batch_size % shards:
    raise ValueError(f"{field}={batch_size} must be divisible by the {shards} devices of the "
                     f"mesh's axes {axes} {dict(mesh.shape)}{hint}")


def shard_batch(host_batch: PyTree, mesh: Mesh) -> PyTree:
  """Makes global arrays from this process's numpy batch (`[B_host, ...]` leaves).

  The global batch is the concatenation of every process's batch, in process order.
  """
  sharding = batch_sharding(mesh)
  shards = axis_size(mesh, sharding.spec[0])
  per_process = shards // jax.process_count()

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % max(per_process, 1):
      raise ValueError(f"the per-host batch size ({x.shape[:1]}) must be a multiple of the "
                       f"{max(per_process, 1)} batch shards on this host (mesh {dict(mesh.shape)}); "
                       "change data.batch_size")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(one, host_batch)


def on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
  """`tree` with every array that lives on other devices than `mesh`'s replicated onto it; the
  others keep their sharding. Variables restored from a checkpoint written on another device
  count (a teacher trained on one device, evaluated on all cores) come back committed to their
  old devices, and a jitted step mixing them with a batch sharded on `mesh` would fail."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if not isinstance(x, jax.Array) or x.sharding.device_set == devices:
      return x
    return jax.device_put(np.asarray(x) if x.is_fully_addressable else x, replicated)

  return jax.tree.map(one, tree)


def jit_train_step(step: Callable, mesh: Mesh, state_shardings_: PyTree) -> Callable:
  """`jax.jit` of `step(state, batch, rng) -> (state, metrics)` on `mesh`.

  The state is donated and keeps its shardings; the batch is sharded by `batch_sharding`;
  the rng and the metrics are replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings_, batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings_, replicated), donate_argnums=0)


def shard_train_step(step: Callable, state, mesh: Mesh, rules: Rules = (), *,
                     fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """Places `state` on `mesh` by `rules` and jits `step` for it.

  Returns:
    `(jitted_step, state)`: call `jitted_step(state, shard_batch(host_batch, mesh), rng)`.
  """
  state_sh = state_shardings(state, mesh, rules, fsdp_min_size=fsdp_min_size)
  return jit_train_step(step, mesh, state_sh), jax.device_put(state, state_sh)


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)`; a no-op in a one-process run."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def host_device_count(cores: int, batch_sizes: Sequence[int], fixed_axes: int = 1) -> int:
  """The most host devices, at most `cores`, that divide every batch size and are a multiple of
  the mesh's fixed axis sizes (`fixed_axes`, their product); 1 when none is more than 1."""
  common = int(np.gcd.reduce([int(b) for b in batch_sizes])) if batch_sizes else 1
  return next((n for n in range(max(cores, 1), 1, -1)
               if common % n == 0 and n % fixed_axes == 0), 1)


def use_host_cores(batch_sizes: Sequence[int], axes: Sequence[tuple[str, int]] = ((DATA_AXIS, -1),),
                   requested: int = -1) -> int:
  """Makes the CPU platform one XLA device per core (`jax_num_cpu_devices`), before JAX starts.

  One XLA:CPU device runs a step's ops on few threads; several host devices on the `data` axis
  run the batch's shards in parallel. The count is the largest one, at most the cores this
  process may use, that divides every batch size (and fits `axes`' fixed sizes). It changes only
  the CPU platform: on GPU/TPU the mesh is built from the accelerators as before.

  Args:
    batch_sizes: every batch the job shards (train, eval, ...).
    axes: the config's `mesh.axes`.
    requested: `mesh.cpu_devices`: -1 picks as above, 0 leaves XLA's default (one device), N > 0
      asks for exactly N.

  Returns:
    The CPU device count set, or 0 when left alone: `requested` is 0, the user already chose one
    (`--xla_force_host_platform_device_count` in `XLA_FLAGS`, or `jax_num_cpu_devices`), or JAX's
    backends have already started.
  """
  if requested == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  if jax.config.jax_num_cpu_devices != -1:
    return 0
  fixed = int(np.prod([size for _, size in axes if size != -1]))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  count = requested if requested > 0 else host_device_count(cores or 1, batch_sizes, fixed)
  if count <= 1:
    return 0
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends have started: the device count is fixed
    return 0
  return count


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process run with `jax.distributed.initialize`; no-op for one process.

  Unset arguments come from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`. Call it before any other JAX call. On CPU, cross-process collectives
  use gloo (jax's default `jax_cpu_collectives_implementation`).

  Returns:
    True if this process joined a multi-process run.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()) or num_processes == 1:
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"multi-host start-up needs {missing} as well (config mesh.{missing[0]} or "
                     f"environment JAX_{missing[0].upper()}); got {given}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True
