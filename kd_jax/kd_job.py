"""The knowledge-distillation job: teacher → label-only baseline student → KD student.

`run(config, workdir)` trains (or restores) each stage, evaluates all three on the eval
split, writes `results.json` and returns the rows of the comparison table. Every stage
resumes from its own checkpoints, so rerunning with the same workdir continues where a
killed run stopped, and a finished teacher is restored, not retrained.
"""
import dataclasses
import json
import os

import jax

from kd_jax import checkpoint, data, models, optim, precision, trainer
from kd_jax.distiller import Distiller, Term, supervised


def _build(model_name: str, model_kwargs: dict, field: str, num_classes: int, dtype, image_shape,
           rng):
  """Creates a model; returns (apply_fn, variables, metadata)."""
  if not model_name:
    raise ValueError(f"{field} is empty; choose one of: {', '.join(models.list_models())}")
  try:
    module = models.create_model(model_name, num_classes=num_classes, dtype=dtype, **model_kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{field}: {e}") from None
  params, model_state = models.init_model(module, rng, (1, *image_shape))
  metadata = {"model": model_name, "model_kwargs": model_kwargs, "num_classes": num_classes,
              "image_shape": list(image_shape)}
  return models.make_apply_fn(module), {"params": params, **model_state}, metadata


def distill_terms(config) -> list[Term]:
  """`config.distill.terms` (a sequence of dicts) as `Term`s, errors naming the entry."""
  terms = config.distill.terms
  if not isinstance(terms, (list, tuple)):
    raise ValueError(f"distill.terms must be a tuple of term dicts, got {type(terms).__name__}")
  return [Term.from_config(t.to_dict() if hasattr(t, "to_dict") else t, f"distill.terms[{i}]")
          for i, t in enumerate(terms)]


def _open(data_config, split: str, data_dir):
  if data_config.in_memory:
    return data.ArrayDataSource(*data.load_arrays(data_config.name, split, data_dir))
  return data.open_source(data_config.name, split, data_dir)


def run(config, workdir: str) -> list[dict]:
  """Runs the job described by `config` (see configs/common.py:kd_config) in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  dtype = precision.compute_dtype(config.precision)
  data_dir = config.data.data_dir or None
  info = data.dataset_info(config.data.name, data_dir)
  train_source, eval_source = (_open(config.data, split, data_dir)
                               for split in (config.data.train_split, config.data.eval_split))
  batch_size = config.data.batch_size
  if batch_size > len(train_source):
    raise ValueError(f"data.batch_size={batch_size} exceeds the {len(train_source)} examples of "
                     f"{config.data.name}:{config.data.train_split}; lower it")
  steps_per_epoch = data.steps_per_epoch(len(train_source), batch_size)
  image_shape = tuple(info.image_shape)
  augment = data.AugmentConfig(crop_padding=config.data.crop_padding, flip=config.data.flip)

  def train_batches(seed):
    return lambda start: data.train_batches(
        train_source, batch_size=batch_size, seed=seed, start_step=start, augment=augment,
        mean=info.mean, std=info.std, process_index=jax.process_index(), process_count=jax.process_count())

  # Rounded up to whole batch shards; the extra rows are padding with mask 0.
  eval_batch_size = -(-config.data.eval_batch_size // jax.device_count()) * jax.device_count()

  def eval_batches():
    return data.eval_batches(eval_source, batch_size=eval_batch_size,
                             mean=info.mean, std=info.std, process_index=jax.process_index(), process_count=jax.process_count())

  def make_tx(num_epochs):
    total = num_epochs * steps_per_epoch
    o = config.optim
    schedule = optim.make_schedule(name=o.schedule, learning_rate=o.learning_rate,
                                   total_steps=total, steps_per_epoch=steps_per_epoch,
                                   decay_epochs=o.decay_epochs, decay_rate=o.decay_rate,
                                   warmup_epochs=o.warmup_epochs)
    return optim.make_optimizer(name=o.name, schedule=schedule, momentum=o.momentum,
                                nesterov=o.nesterov, weight_decay=o.weight_decay), total

  for field in ("teacher.num_epochs", "student.num_epochs"):
    group, key = field.split(".")
    if config[group][key] < 1:
      raise ValueError(f"{field} must be >= 1, got {config[group][key]}")

  rng_teacher, rng_student = jax.random.split(jax.random.PRNGKey(config.seed))
  teacher_apply, teacher_vars, teacher_meta = _build(
      config.teacher.model, config.teacher.model_kwargs.to_dict(), "teacher.model", info.num_classes, dtype, image_shape, rng_teacher)
  student_apply, student_vars, student_meta = _build(
      config.student.model, config.student.model_kwargs.to_dict(), "student.model", info.num_classes, dtype, image_shape, rng_student)
  terms = distill_terms(config)
  distiller = Distiller(student_apply, terms, {"teacher": teacher_apply},
                        num_data=len(train_source))
  # Fails at start-up, not after the teacher has trained, on bad taps, shapes or hparams.
  trainer.check_stage(trainer.Stage("student_kd", distiller, {"student": student_vars,
                                                              "teacher": teacher_vars},
                                    {}, make_tx(1)[0], 1), train_batches(config.seed), config.seed)

  options = trainer.LoopOptions(seed=config.seed, log_every=config.log.every_steps,
                                checkpoint_every=config.checkpoint.every_steps,
                                keep_checkpoints=config.checkpoint.keep,
                                tensorboard=config.log.tensorboard,
                                mesh_axes=tuple(map(tuple, config.mesh.axes)),
                                mesh_rules=tuple(map(tuple, config.mesh.rules)))
  results = []

  def finish(name, apply_fn, variables, meta):
    metrics = trainer.evaluate(apply_fn, variables, eval_batches(), options.mesh_axes)
    results.append({"stage": name, "model": meta["model"],
                    "params": models.count_params(variables["params"]), **metrics})

  if config.teacher.checkpoint:
    teacher_vars = checkpoint.restore_variables(config.teacher.checkpoint, teacher_meta,
                                                teacher_vars)
  else:
    tx, steps = make_tx(config.teacher.num_epochs)
    teacher_vars = trainer.train(trainer.Stage(
        "teacher", supervised(teacher_apply), {"student": teacher_vars}, teacher_meta, tx, steps),
        workdir, train_batches(config.seed), options)
  finish("teacher", teacher_apply, teacher_vars, teacher_meta)

  tx, steps = make_tx(config.student.num_epochs)
  student_batches = train_batches(config.seed + 1)
  if config.student.baseline:
    baseline_vars = trainer.train(trainer.Stage(
        "student_baseline", supervised(student_apply), {"student": student_vars}, student_meta,
        tx, steps), workdir, student_batches, options)
    finish("student_baseline", student_apply, baseline_vars, student_meta)
  kd_meta = {**student_meta, "teacher": teacher_meta, "terms": [_jsonable(t) for t in terms]}
  kd_vars = trainer.train(trainer.Stage(
      "student_kd", distiller, {"student": student_vars, "teacher": teacher_vars}, kd_meta, tx,
      steps), workdir, student_batches, options)
  finish("student_kd", student_apply, kd_vars, student_meta)
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def _jsonable(term: Term) -> dict:
  """A term as plain JSON (checkpoint metadata): tuples become lists."""
  return json.loads(json.dumps(dataclasses.asdict(term), default=list))


def format_table(rows: list[dict]) -> str:
  """The comparison table the job prints."""
  lines = [f"{'stage':<18} {'model':<22} {'params':>10} {'test acc':>9}", "-" * 62]
  lines += [f"{r['stage']:<18} {r['model']:<22} {r['params']:>10,} {100 * r['accuracy']:>8.2f}%"
            for r in rows]
  return "\n".join(lines)

