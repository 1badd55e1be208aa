"""Runs one training stage: resumable loop, checkpoints, metrics, NaN stop, evaluation.

Used by the knowledge-distillation job for the teacher, the label-only baseline and the
distilled student; regimes reuse it with their own step functions.
"""
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import optax

from kd_jax import checkpoint, metrics, sharding
from kd_jax.train_step import ApplyFn, Objective, TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Stage:
  """One model trained to completion.

  Attributes:
    name: also the stage's sub-directory of the workdir (`teacher`, `student_kd`, ...).
    apply_fn: the trained model's apply function.
    init_variables: `{"params", **model_state}` to start from.
    metadata: checkpoint metadata (`model`, `num_classes`, `image_shape`, ...).
    objective: the loss (see `train_step.make_kd_objective`).
    tx: the optimizer.
    num_steps: total optimisation steps.
    teacher_apply_fn, teacher_variables: the frozen teacher, or None.
    distill_params: params of learnable loss parts, or None.
  """
  name: str
  apply_fn: ApplyFn
  init_variables: dict
  metadata: dict
  objective: Objective
  tx: optax.GradientTransformation
  num_steps: int
  teacher_apply_fn: ApplyFn | None = None
  teacher_variables: Any = None
  distill_params: Any = None


@dataclasses.dataclass
class LoopOptions:
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  tensorboard: bool = True
  mesh_axes: tuple = (("data", -1),)  # see kd_jax.sharding.make_mesh
  mesh_rules: tuple = ()              # parameter-sharding regex table (FSDP etc.)


def evaluate(apply_fn: ApplyFn, variables, batches: Iterable[dict],
             mesh_axes: tuple = (("data", -1),)) -> dict:
  """Exact accuracy and mean loss over `batches` (padding masked out).

  Each host passes its own rows; batches are sharded over the mesh like training batches,
  so their size must be a multiple of the batch shards per host.
  """
  mesh = sharding.make_mesh(mesh_axes)
  eval_step = jax.jit(make_eval_step(apply_fn))
  totals = None
  for batch in batches:
    sums = eval_step(variables, sharding.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["eval/count"]), 1.0)
  return {"accuracy": float(totals["eval/correct"]) / count,
          "loss": float(totals["eval/loss_sum"]) / count, "count": int(totals["eval/count"])}


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
  # Copies: the jitted step donates the state, and callers may reuse init_variables.
  variables = jax.tree.map(jnp.array, stage.init_variables)
  params = variables.pop("params")
  model_state = variables
  state = TrainState.create(params, model_state, stage.tx, stage.distill_params)
  mesh = sharding.make_mesh(options.mesh_axes)
  step_fn, state, teacher_vars = sharding.shard_train_step(
      make_train_step(stage.apply_fn, stage.teacher_apply_fn, stage.objective, stage.tx), state,
      stage.teacher_variables, mesh, options.mesh_rules)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)  # into the shardings just placed
  start = int(state.step)
  rng = jax.random.PRNGKey(options.seed)
  writer = metrics.MetricWriter(stage_dir, tensorboard=options.tensorboard,
                                enabled=jax.process_index() == 0)
  pending = metrics.PendingMetrics()
  bar = metrics.progress_bar(stage.num_steps, start, stage.name)
  last_saved = start if start else None
  try:
    batches = train_batches(start)
    for step in range(start, stage.num_steps):
      batch = sharding.shard_batch(next(batches), mesh)
      state, step_metrics = step_fn(state, teacher_vars, batch, rng)
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
        ckpt.save(done, state)
        last_saved = done
      bar.update(1)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return {"params": state.params, **state.model_state}

