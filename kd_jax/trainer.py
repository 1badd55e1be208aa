"""Runs one training stage: resumable loop, checkpoints, metrics, NaN stop, evaluation.

Used by the knowledge-distillation job for the teacher, the label-only baseline and the
distilled student; any `kd_jax.step.Method` runs through it.
"""
import dataclasses
import os
from typing import Callable, Iterable, Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import checkpoint, metrics, sharding
from kd_jax import step as step_lib


@dataclasses.dataclass
class Stage:
  """One method trained to completion.

  Attributes:
    name: also the stage's sub-directory of the workdir (`teacher`, `student_kd`, ...).
    method: what is trained (`kd_jax.distiller.Distiller` or any `kd_jax.step.Method`).
    variables: the networks' initial variables `{"student": {"params", **model_state},
      <teacher name>: ...}`, handed to `method.init`.
    metadata: checkpoint metadata (`model`, `num_classes`, `image_shape`, terms, ...).
    tx: the optimizer of every trainable part; `ascending` parts climb the loss.
    num_steps: total optimisation steps.
    part_tx: per-part optimizers that replace `tx` (`{part: transformation}`).
  """
  name: str
  method: step_lib.Method
  variables: dict
  metadata: dict
  tx: optax.GradientTransformation
  num_steps: int
  part_tx: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoopOptions:
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  tensorboard: bool = True
  mesh_axes: tuple = (("data", -1),)  # see kd_jax.sharding.make_mesh
  mesh_rules: tuple = ()              # parameter-sharding regex table (FSDP etc.)


def evaluate(apply_fn: Callable, variables, batches: Iterable[dict],
             mesh_axes: tuple = (("data", -1),)) -> dict:
  """Exact accuracy and mean loss over `batches` (padding masked out).

  Each host passes its own rows; batches are sharded over the mesh like training batches,
  so their size must be a multiple of the batch shards per host.
  """
  mesh = sharding.make_mesh(mesh_axes)
  eval_step = jax.jit(step_lib.make_eval_step(apply_fn))
  variables = sharding.on_mesh(variables, mesh)
  totals = None
  for batch in batches:
    sums = eval_step(variables, sharding.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["eval/count"]), 1.0)
  return {"accuracy": float(totals["eval/correct"]) / count,
          "loss": float(totals["eval/loss_sum"]) / count, "count": int(totals["eval/count"])}


def predict(apply_fn: Callable, variables, batches: Iterable[dict],
            mesh_axes: tuple = (("data", -1),)) -> tuple[np.ndarray, np.ndarray]:
  """`(logits [N, K], labels [N])` of every real (mask 1) row of `batches`, from all hosts."""
  mesh = sharding.make_mesh(mesh_axes)
  logits_fn = jax.jit(lambda v, images: apply_fn(v, images, train=False)[0].logits)
  variables = sharding.on_mesh(variables, mesh)
  parts = []
  for batch in batches:
    sharded = sharding.shard_batch(batch, mesh)
    parts.append([multihost_utils.process_allgather(a, tiled=True) for a in (
        logits_fn(variables, sharded["image"]), sharded["label"], sharded["mask"])])
  logits, labels, mask = (np.concatenate(p) for p in zip(*parts))
  labels = labels.argmax(-1) if labels.ndim == 2 else labels
  return logits[mask > 0], labels[mask > 0]


def train(stage: Stage, workdir: str, train_batches: Callable[[int], Iterator[dict]],
          options: LoopOptions) -> dict:
  """Trains `stage` to `num_steps`, resuming from its latest checkpoint.

  Args:
    stage: what to train.
    workdir: the job's workdir; the stage writes `workdir/<name>/{checkpoints,metrics.jsonl,
      tensorboard}`.
    train_batches: `start_step -> iterator` of batches for steps start_step, start_step+1, …
      (deterministic, so a resumed run sees the batches an uninterrupted run sees).
    options: logging and checkpoint cadence.
  Returns:
    The final variables `{"params", **model_state}`.
  Raises:
    metrics.NonFiniteLossError: the loss became NaN/Inf; the message names the step, and
      the last checkpoint written is from before it.
  """
  stage_dir = os.path.join(workdir, stage.name)
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), stage.metadata,
                                 keep=options.keep_checkpoints)
  state, tx = init_state(stage, next(train_batches(0)), options.seed)
  mesh = sharding.make_mesh(options.mesh_axes)
  step_fn, state = sharding.shard_train_step(step_lib.make_train_step(stage.method, tx), state,
                                             mesh, options.mesh_rules)
  # Into the shardings just placed; corrupt steps are skipped and moved aside.
  restored, _ = ckpt.restore_latest(checkpointed(state, stage.method))
  if restored is not None:
    state = restored.replace(frozen={**state.frozen, **restored.frozen})
  start = int(state.step)
  rng = jax.random.PRNGKey(options.seed)
  writer = metrics.MetricWriter(stage_dir, tensorboard=options.tensorboard,
                                enabled=jax.process_index() == 0, start_step=start)
  pending = metrics.PendingMetrics()
  bar = metrics.progress_bar(stage.num_steps, start, stage.name)
  last_saved = start if start else None
  try:
    batches = train_batches(start)
    for step in range(start, stage.num_steps):
      batch = sharding.shard_batch(next(batches), mesh)
      state, step_metrics = step_fn(state, batch, rng)
      pending.add(step + 1, step_metrics)
      done = step + 1
      at_log = done % options.log_every == 0 or done == stage.num_steps
      at_ckpt = done % options.checkpoint_every == 0 or done == stage.num_steps
      if at_log or at_ckpt:
        try:
          means = pending.check_and_mean()
        except metrics.NonFiniteLossError as e:
          ckpt.wait()
          kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
                  if last_saved is not None else "no checkpoint had been written yet")
          raise metrics.NonFiniteLossError(f"stage {stage.name!r}: {e}; stopping. {kept}. "
                                           "Lower optim.learning_rate or check the data.") from None
        writer.write(done, means)
        bar.set_postfix(loss=f"{means['train/loss']:.4f}", refresh=False)
      if at_ckpt:
        ckpt.save(done, checkpointed(state, stage.method))
        last_saved = done
      bar.update(1)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return student_variables(state)


def init_state(stage: Stage, example_batch: dict, seed: int):
  """The stage's initial `TrainState` (learnable parts shaped on `example_batch`, e.g. the
  first training batch) and its optimizer."""
  trainable, frozen, extra = stage.method.init(jax.random.PRNGKey(seed + 1), stage.variables,
                                               example_batch)
  overrides = {part: step_lib.ascend(stage.part_tx.get(part, stage.tx))
               for part in getattr(stage.method, "ascending_parts", ())}
  tx = step_lib.per_part_optimizer(trainable, stage.tx, {**stage.part_tx, **overrides})
  # Copies: the jitted step donates the state, and callers may reuse the variables.
  return step_lib.TrainState.create(tx, *jax.tree.map(jnp.array, (trainable, frozen, extra))), tx


def final_state(stage: Stage, workdir: str, example_batch: dict,
                seed: int = 0) -> step_lib.TrainState:
  """The latest checkpoint of `stage` in `workdir`, restored into the stage's state structure
  (what a checkpoint holds: fixed frozen networks are absent) as host numpy arrays. For methods
  that train several networks, whose variables `train`'s return value does not include."""
  template, _ = init_state(stage, example_batch, seed)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, stage.name, "checkpoints"), stage.metadata)
  try:
    return jax.device_get(ckpt.restore(checkpointed(template, stage.method)))
  finally:
    ckpt.close()


def check_stage(stage: Stage, train_batches: Callable[[int], Iterator[dict]], seed: int) -> None:
  """Builds the stage's state and traces its step on abstract values, so bad taps, shapes or
  hyperparameters fail at start-up with the term's name, before anything trains."""
  batch = next(train_batches(0))
  state, tx = init_state(stage, batch, seed)
  jax.eval_shape(step_lib.make_train_step(stage.method, tx), state, batch,
                 jax.random.PRNGKey(seed))


def checkpointed(state: step_lib.TrainState, method) -> step_lib.TrainState:
  """The part of `state` a checkpoint holds: everything but the frozen networks that never
  change (teachers come from their own stage or checkpoint); frozen networks the method updates
  (`method.evolving_frozen`, e.g. an EMA teacher) are kept."""
  evolving = getattr(method, "evolving_frozen", ())
  return state.replace(frozen={k: v for k, v in state.frozen.items() if k in evolving})


def student_variables(state: step_lib.TrainState) -> dict:
  """`{"params", **model_state}` of the student in `state`."""
  return {"params": state.trainable["student"], **state.extra["model_state"]["student"]}

