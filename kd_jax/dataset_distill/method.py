"""What a dataset-distillation method provides to the one outer loop (`distill.distill`).

A method turns real data into a small synthetic set. It implements `Method`::

  prepare(context)                     once, before the loop: expensive set-up that the
                                       objective needs (trajectory matching's expert buffer,
                                       RDED's scored patches); nothing for DM.
  start(context) -> Start              the values the loop optimises (images, label logits, α,
                                       compensators), one optax optimizer per value, and any
                                       method state carried between iterations (DC's network).
  value_and_grad(values, state, i)     the objective at iteration i and its gradient with
    -> Step                            respect to the values; grads None skips the update.
  distilled(values) -> DistilledSet    the set to evaluate and save.

A method that reads `context.teacher` says so with a class attribute `uses_teacher = True`
(the job then trains the teacher). `iterations` is the number of outer iterations (0 for a
selection method such as RDED, whose `start` already holds the final set). Every random draw
of iteration i must depend on (context.seed, i) only (`iteration_rng`, `iteration_key`): then a
killed run resumes to the set an uninterrupted run ends with. Adding a method is one file with
one class: reach it from a config by `distill.method="package.module:ClassName"` (its
hyperparameters from `method_kwargs`), or register it in
`kd_jax.dataset_distill.methods.METHODS`.
"""
import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np
import optax
from jax.sharding import Mesh

LABEL_KINDS = ("hard", "probs", "logits")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A trained network: `apply_fn(variables, x, train=False) -> (ModelOutput, state)`."""
  apply_fn: Callable
  variables: dict


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may read.

  Attributes:
    train_images: `[N, H, W, C]` float32, normalised (and ZCA-whitened when the job says so).
    train_labels: `[N]` int class ids.
    num_classes, ipc: the set has `num_classes·ipc` images, class c's at `c·ipc ... c·ipc+ipc-1`.
    apply_fn, init_params: the network the set is distilled for and evaluated on (stateless,
      e.g. ConvNet with instance norm); `init_params(key) -> params`.
    augment: DSA, `augment(images [B, H, W, C], key) -> images`, or None.
    teacher: a network trained on the real data (BatchNorm allowed), or None.
    seed: the run's seed.
    workdir: where a method may keep what `prepare` builds (the expert buffer).
    mesh: the job's device mesh, or None.
    log: progress messages.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  num_classes: int
  ipc: int
  apply_fn: Callable
  init_params: Callable
  augment: Callable | None
  teacher: Teacher | None
  seed: int
  workdir: Path
  mesh: Mesh | None = None
  log: Callable = print


@dataclasses.dataclass
class Start:
  """What the loop starts from.

  Attributes:
    values: `{name: array}` learned by the loop, e.g. `{"images": [S, H, W, C], "lr": []}`.
    optimizers: `{name: optax transformation}`, one for each key of `values`.
    state: method state carried from one iteration to the next and checkpointed with the values
      (`{}` when there is none).
  """
  values: dict[str, jax.Array]
  optimizers: dict[str, optax.GradientTransformation]
  state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Step:
  """One iteration's result: the loss, `{name: gradient}` for the values (None: skip the
  update, DATM's threshold), the next method state and extra scalar metrics (logged as
  `distill/<name>`)."""
  loss: jax.Array
  grads: dict[str, jax.Array] | None
  state: Any = dataclasses.field(default_factory=dict)
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DistilledSet:
  """The distilled set.

  Attributes:
    images: `[S, H, W, C]` the training images (INFER: base images plus every compensator).
    labels: `[S]` class ids ("hard") or `[S, C]` probabilities (`label_kind` "probs"/"logits").
    label_kind: "hard", "probs" or "logits" (learned logits; `labels` holds their softmax).
    lr: the learned inner step size α, or None.
    stored_floats: the floats the method stores to rebuild the set (images, labels, α, ...).
    label_logits: `[S, C]` learned logits (label_kind "logits"), else None.
  """
  images: np.ndarray
  labels: np.ndarray
  label_kind: str
  lr: float | None
  stored_floats: int
  label_logits: np.ndarray | None = None


class Method(Protocol):
  """A dataset-distillation method (see the module docstring)."""
  name: str
  iterations: int

  def prepare(self, context: Context) -> None:
    ...

  def start(self, context: Context) -> Start:
    ...

  def value_and_grad(self, values: dict, state: Any, iteration: int) -> Step:
    ...

  def distilled(self, values: dict) -> DistilledSet:
    ...


def iteration_rng(seed: int, iteration: int) -> np.random.Generator:
  """The host generator of `iteration`: the iteration-th child of `SeedSequence(seed)`."""
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(iteration,)))


def iteration_key(seed: int, iteration: int) -> jax.Array:
  """The JAX key of `iteration`: `fold_in(key(seed), iteration)`."""
  return jax.random.fold_in(jax.random.key(seed), iteration)


def class_ids(num_classes: int, ipc: int) -> np.ndarray:
  """`[num_classes·ipc]` int32: the class of each synthetic image in class order."""
  return np.repeat(np.arange(num_classes), ipc).astype(np.int32)


def stored_floats(values: dict) -> int:
  """Floats in `values` (what a method that stores exactly its learned values keeps)."""
  return int(sum(np.size(v) for v in values.values()))


def hard_label_set(values: dict, context: Context) -> DistilledSet:
  """The set of a method that learns only `values["images"]` `[C·ipc, H, W, C]` in class order:
  hard labels, no α, the images as everything stored."""
  return DistilledSet(images=np.asarray(values["images"], np.float32),
                      labels=class_ids(context.num_classes, context.ipc), label_kind="hard",
                      lr=None, stored_floats=stored_floats(values))
