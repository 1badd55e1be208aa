"""Trajectory matching (MTT, TESLA, DATM) as a `method.Method`.

`prepare` trains (or loads) the expert buffer (`experts.train_experts`). Each iteration samples
an expert and a start epoch t from the window, runs N inner SGD steps from θ*_t on synthetic
minibatches and matches θ*_{t+M} (`matching.TrajectoryMatcher`: exact, TESLA or unrolled
gradient). With `segments=G > 1` it samples G (expert, start epoch) pairs and matches their
mean loss; on a mesh with a `segment` axis each device group runs one of them, and each
minibatch is split over `data`.
Images, α and learned label logits each have their own optimizer, MTT/DATM's defaults: SGD
momentum 0.5 for images (lr_img) and α (lr_lr), SGD momentum 0.9 for labels (lr_label).
Labels: "hard" (MTT), "probs" (TESLA: the target expert's softmax, fixed), "logits" (DATM:
learned, initialised from the experts that classify the image correctly).
Metrics: `distill/lr` (α used in the iteration) and `distill/start_epoch` (mean over segments).
"""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kd_jax.dataset_distill.datm import StartWindow, should_update
from kd_jax.dataset_distill.experts import train_experts
from kd_jax.dataset_distill.matching import (TrajectoryMatcher, label_targets, make_inner_step,
                                             minibatch_plan)
from kd_jax.dataset_distill.method import (Context, DistilledSet, Start, Step, iteration_key,
                                           iteration_rng, stored_floats)
from kd_jax.dataset_distill.synthetic import init_images, init_labels


@dataclasses.dataclass(frozen=True)
class ExpertRecipe:
  """The expert buffer: MTT's recipe (SGD `lr`, no momentum, `batch_size`, DSA when the job
  has it); expert k uses seed `seed + k`. `directory` "" keeps it in `<workdir>/experts`;
  `metadata` identifies the data and model (checked when a buffer is reused)."""
  num_experts: int = 100
  epochs: int = 50
  lr: float = 0.01
  batch_size: int = 256
  directory: str = ""
  metadata: dict = dataclasses.field(default_factory=dict)
  rules: tuple = ()  # parameter sharding of the experts (kd_jax.sharding.state_shardings)


@dataclasses.dataclass
class TrajectoryMatching:
  """Hyperparameters (MTT's flag names where they exist).

  `trajectories` `[experts, epochs + 1, P]` given directly skips the expert buffer.
  """
  iterations: int
  syn_steps: int                 # N
  expert_epochs: int             # M
  window: StartWindow
  lr_img: float
  lr_lr: float
  batch_syn: int = 0             # 0: every synthetic image in each inner step
  lr_label: float = 2.0          # DATM lr_y
  momentum_label: float = 0.9    # DATM Momentum_y
  lr_init: float = 0.01          # α₀
  image_init: str = "real"       # "real" | "real_correct" (DATM) | "noise"
  label_kind: str = "hard"
  mode: str = "exact"
  threshold: float | None = None
  segments: int = 1              # (expert, start epoch) pairs matched per iteration
  keep_every: int = 1            # exact/tesla: θ kept every k steps, the rest recomputed
  experts: ExpertRecipe = ExpertRecipe()
  trajectories: np.ndarray | None = None
  name: str = "mtt"

  def prepare(self, context: Context) -> None:
    _, unravel = ravel_pytree(context.init_params(jax.random.key(0)))
    self._seed = context.seed
    self._logits = jax.jit(lambda theta, x: context.apply_fn({"params": unravel(theta)}, x,
                                                             train=False)[0].logits)
    if self.trajectories is None:
      e = self.experts
      self.trajectories, _ = train_experts(
          Path(e.directory or Path(context.workdir) / "experts"), context.apply_fn,
          context.init_params, context.train_images, context.train_labels,
          metadata=e.metadata, num_experts=e.num_experts, epochs=e.epochs, lr=e.lr,
          batch_size=e.batch_size, seed=context.seed, augment=context.augment,
          mesh=context.mesh, rules=e.rules, log=context.log)
    num_epochs = self.trajectories.shape[1]
    if self.window.max_start - 1 + self.expert_epochs > num_epochs - 1:
      raise ValueError(f"start epochs up to max_start_epoch - 1 = {self.window.max_start - 1} "
                       f"plus expert_epochs = {self.expert_epochs} exceed the experts' "
                       f"{num_epochs - 1} epochs; lower them or train longer experts")
    step = make_inner_step(context.apply_fn, unravel, label_kind=self.label_kind,
                           augment=context.augment)
    self._matcher = TrajectoryMatcher(step, mode=self.mode,
                                      learn_labels=self.label_kind == "logits",
                                      segments=self.segments, mesh=context.mesh,
                                      keep_every=self.keep_every)

  def expert_logits(self, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """`[E, S, C]` logits of `images` under every expert's final params."""
    return np.stack([np.concatenate([np.asarray(self._logits(jnp.asarray(trajectory[-1]),
                                                       images[i:i + chunk]))
                                     for i in range(0, len(images), chunk)])
                     for trajectory in self.trajectories])

  def start(self, context: Context) -> Start:
    rng = np.random.default_rng(context.seed)
    images, class_ids = init_images(rng, context.train_images, context.train_labels,
                                    num_classes=context.num_classes, ipc=context.ipc,
                                    init=self.image_init,
                                    predict=lambda x: self.expert_logits(x)[0])
    labels = init_labels(self.label_kind, class_ids, context.num_classes,
                         self.expert_logits(images) if self.label_kind != "hard" else None)
    values = {"images": jnp.asarray(images), "lr": jnp.asarray(self.lr_init, jnp.float32)}
    optimizers = {"images": optax.sgd(self.lr_img, momentum=0.5),
                  "lr": optax.sgd(self.lr_lr, momentum=0.5)}
    self._fixed_labels = jnp.asarray(labels)
    if self.label_kind == "logits":
      values["labels"] = jnp.asarray(labels)
      optimizers["labels"] = optax.sgd(self.lr_label, momentum=self.momentum_label)
    return Start(values, optimizers)

  def _labels(self, values):
    return values.get("labels", self._fixed_labels)

  def value_and_grad(self, values: dict, state, iteration: int) -> Step:
    num_synthetic = values["images"].shape[0]
    starts, theta_start, theta_target, indices, keys = iteration_draws(
        self.trajectories, self, num_synthetic, self._seed, iteration)
    loss, grads = self._matcher(theta_start, theta_target, values["images"],
                                self._labels(values), values["lr"], indices, keys)
    step_metrics = {"lr": float(values["lr"]), "start_epoch": float(np.mean(starts))}
    if not should_update(float(loss), self.threshold):
      return Step(loss, None, state, step_metrics)
    named = {"images": grads.images, "lr": grads.lr}
    if grads.labels is not None:
      named["labels"] = grads.labels
    return Step(loss, named, state, step_metrics)

  def distilled(self, values: dict) -> DistilledSet:
    labels = self._labels(values)
    return DistilledSet(
        images=np.asarray(values["images"]),
        labels=np.asarray(label_targets(labels, self.label_kind)), label_kind=self.label_kind,
        lr=float(values["lr"]), stored_floats=stored_floats({**values, "labels": labels}),
        label_logits=np.asarray(labels) if self.label_kind == "logits" else None)


def iteration_draws(trajectories: np.ndarray, matching: TrajectoryMatching, num_synthetic: int,
                    seed: int, iteration: int):
  """The random draws of `iteration`, a function of (`seed`, `iteration`) only.

  Host draws (experts, start epochs, minibatches) come from `method.iteration_rng`,
  augmentation keys from `method.iteration_key`.
  Returns (start epochs, θ_start, θ_target, indices `[N, batch_syn]`, keys `[N]`), each but
  the start epochs with a leading `[G]` axis when `segments = G > 1`.
  """
  rng = iteration_rng(seed, iteration)
  segments, steps = matching.segments, matching.syn_steps
  starts, theta_start, theta_target, indices = [], [], [], []
  for _ in range(segments):
    expert = int(rng.integers(trajectories.shape[0]))
    starts.append(matching.window.sample(rng, iteration))
    theta_start.append(trajectories[expert, starts[-1]])
    theta_target.append(trajectories[expert, starts[-1] + matching.expert_epochs])
    indices.append(minibatch_plan(rng, num_synthetic, matching.batch_syn or num_synthetic,
                                  steps))
  stack = lambda parts: np.stack(parts) if segments > 1 else parts[0]
  keys = jax.random.split(iteration_key(seed, iteration), segments * steps)
  if segments > 1:
    keys = keys.reshape(segments, steps)
  return (starts, jnp.asarray(stack(theta_start)), jnp.asarray(stack(theta_target)),
          stack(indices), keys)
