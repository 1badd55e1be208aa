"""The knowledge-distillation job: teacher → label-only baseline student → KD student.

`run(config, workdir)` trains (or restores) each stage, evaluates them on the eval split,
writes `results.json` and returns the rows of the comparison table.

Fair by construction: with `tune.validation_examples = V`, each student arm (baseline, KD)
first trains with every recipe of the `tune` grid (shifts on/off, learning rate, epochs) on
train minus its last V examples, distilling from a teacher trained on that part only, and is
scored on those V examples. Each arm then trains on the whole train split with its own best
recipe (`validation.json` records the grid); the test split is used only for the final rows.

The students' transfer set can leave one class out (`student.omit_class`: Hinton's experiment,
with `+bias` rows whose logit bias for that class is fitted on the train split) or keep a
stratified fraction of train (`student.label_fraction`; the teacher trains on the full split,
or on the same subset with `teacher.on_label_subset`).

Every stage resumes from its own checkpoints, so rerunning with the same workdir continues
where a killed run stopped, and a finished stage is restored, not retrained.
"""
import dataclasses
import itertools
import json
import os

import jax

from kd_jax import checkpoint, class_bias, data, experiment, models, trainer
from kd_jax.distiller import Distiller, Term, supervised


def distill_terms(config) -> list[Term]:
  """`config.distill.terms` (a sequence of dicts) as `Term`s, errors naming the entry."""
  terms = config.distill.terms
  if not isinstance(terms, (list, tuple)):
    raise ValueError(f"distill.terms must be a tuple of term dicts, got {type(terms).__name__}")
  return [Term.from_config(t.to_dict() if hasattr(t, "to_dict") else t, f"distill.terms[{i}]")
          for i, t in enumerate(terms)]


def recipe_grid(config) -> list[experiment.Recipe]:
  """The student recipes tried on validation (`config.tune`), or the config's own recipe when
  `tune.validation_examples` is 0."""
  t = config.tune
  if not t.validation_examples:
    return [experiment.Recipe(config.data.crop_padding, config.optim.learning_rate,
                   config.student.num_epochs)]
  for field in ("crop_padding", "learning_rate", "num_epochs"):
    if not t[field]:
      raise ValueError(f"tune.{field} is empty; give at least one value, or set "
                       "tune.validation_examples=0 to train with the config's own recipe")
  return [experiment.Recipe(*r)
          for r in itertools.product(t.crop_padding, t.learning_rate, t.num_epochs)]


def _check(config, num_classes: int) -> None:
  """Start-up checks of the fields that shape the stages, each error naming its field."""
  for field in ("teacher.num_epochs", "student.num_epochs"):
    group, key = field.split(".")
    if config[group][key] < 1:
      raise ValueError(f"{field} must be >= 1, got {config[group][key]}")
  if not -1 <= config.student.omit_class < num_classes:
    raise ValueError(f"student.omit_class must be -1 (none) or a class in 0..{num_classes - 1}, "
                     f"got {config.student.omit_class}")
  if not 0 < config.student.label_fraction <= 1:
    raise ValueError(f"student.label_fraction must be in (0, 1], got "
                     f"{config.student.label_fraction}")


def run(config, workdir: str) -> list[dict]:
  """Runs the job described by `config` (see configs/common.py:kd_config) in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  exp = experiment.Experiment(config)
  train_source = exp.train_source
  _check(config, exp.info.num_classes)
  if config.tune.validation_examples:  # split now: a bad size fails at start-up
    validation_split = exp.split_train(config.tune.validation_examples,
                                       "tune.validation_examples", " (or be 0: no tuning)")
  grid = recipe_grid(config)
  omitted = config.student.omit_class

  def labeled_subset(source):
    fraction = config.student.label_fraction
    if fraction == 1:
      return source
    return data.subset(source, data.stratified_fraction(data.class_ids(source), fraction,
                                                        config.seed))

  def transfer_set(source):
    """What the students train on: the labeled fraction, without the omitted class."""
    source = labeled_subset(source)
    if omitted < 0:
      return source
    return data.subset(source, data.without_class(data.class_ids(source), omitted))

  def teacher_set(source):
    return labeled_subset(source) if config.teacher.on_label_subset else source

  rng_teacher, rng_student = jax.random.split(jax.random.PRNGKey(config.seed))
  teacher_apply, teacher_init, teacher_meta = exp.build(
      config.teacher.model, config.teacher.model_kwargs.to_dict(), "teacher.model", rng_teacher)
  student_apply, student_init, student_meta = exp.build(
      config.student.model, config.student.model_kwargs.to_dict(), "student.model", rng_student)
  terms = distill_terms(config)
  kd_meta = {**student_meta, "teacher": teacher_meta, "terms": [_jsonable(t) for t in terms]}
  arms = {"student_kd": (lambda n: Distiller(student_apply, terms, {"teacher": teacher_apply},
                                             num_data=n), kd_meta)}
  if config.student.baseline:
    arms = {"student_baseline": (lambda n: supervised(student_apply), student_meta), **arms}
  # Fails at start-up, not after the teacher has trained, on bad taps, shapes or hparams.
  trainer.check_stage(trainer.Stage("student_kd", arms["student_kd"][0](len(train_source)),
                                    {"student": student_init, "teacher": teacher_init}, {},
                                    exp.make_tx(grid[0].learning_rate, 1, len(train_source))[0],
                                    1),
                      exp.train_batches(transfer_set(train_source), config.seed, 0), config.seed)
  options = exp.options

  def train_teacher(name, source):
    source = teacher_set(source)
    tx, steps = exp.make_tx(config.optim.learning_rate, config.teacher.num_epochs, len(source))
    return trainer.train(trainer.Stage(
        name, supervised(teacher_apply), {"student": teacher_init}, teacher_meta, tx, steps),
        workdir, exp.train_batches(source, config.seed, config.data.crop_padding), options)

  def train_arm(name, arm, recipe, source, teacher_vars):
    source = transfer_set(source)
    make_method, meta = arms[arm]
    tx, steps = exp.make_tx(recipe.learning_rate, recipe.num_epochs, len(source))
    return trainer.train(trainer.Stage(
        name, make_method(len(source)), {"student": student_init, "teacher": teacher_vars},
        {**meta, "recipe": dataclasses.asdict(recipe)}, tx, steps),
        workdir, exp.train_batches(source, config.seed + 1, recipe.crop_padding), options)

  # A restored teacher is checked before anything trains.
  teacher_vars = (checkpoint.restore_variables(config.teacher.checkpoint, teacher_meta,
                                               teacher_init) if config.teacher.checkpoint else None)
  chosen = {arm: grid[0] for arm in arms}
  if config.tune.validation_examples:
    chosen = _tune(config, workdir, grid, list(arms), validation_split, train_teacher, train_arm,
                   lambda variables, source: exp.evaluate(student_apply, variables, source))

  results = []

  def finish(name, apply_fn, variables, meta, recipe):
    row = {"stage": name, "model": meta["model"], "recipe": recipe,
           "params": models.count_params(variables["params"]),
           **exp.evaluate(apply_fn, variables)}
    results.append(row)
    if omitted < 0:
      return
    logits, labels = trainer.predict(apply_fn, variables, exp.eval_batches(), options.mesh_axes)
    row["omitted_class_accuracy"] = class_bias.accuracy(logits, labels, omitted)
    if name == "teacher":
      return
    # Hinton's correction, fitted on the train split (the student never saw its `omitted` rows).
    bias = class_bias.fit_class_bias(*trainer.predict(
        apply_fn, variables, exp.eval_batches(train_source), options.mesh_axes), omitted)
    shifted = class_bias.with_class_bias(logits, omitted, bias)
    results.append({**row, "stage": f"{name}+bias", "class_bias": bias,
                    "accuracy": class_bias.accuracy(shifted, labels),
                    "omitted_class_accuracy": class_bias.accuracy(shifted, labels, omitted)})

  if teacher_vars is None:
    teacher_vars = train_teacher("teacher", train_source)
    teacher_recipe = str(experiment.Recipe(config.data.crop_padding, config.optim.learning_rate,
                                           config.teacher.num_epochs))
  else:
    teacher_recipe = f"restored from {config.teacher.checkpoint}"
  finish("teacher", teacher_apply, teacher_vars, teacher_meta, teacher_recipe)
  for arm in arms:
    variables = train_arm(arm, arm, chosen[arm], train_source, teacher_vars)
    finish(arm, student_apply, variables, student_meta, str(chosen[arm]))
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def _tune(config, workdir, grid, arms, validation_split, train_teacher, train_arm, evaluate):
  """Trains every arm with every recipe of `grid` on train minus its last
  `tune.validation_examples` examples (with a teacher trained on that part too), evaluates on
  those examples, writes `validation.json` and returns each arm's best recipe (the first of
  equals)."""
  fit, held_out = validation_split
  n = len(fit)
  teacher_vars = train_teacher("validation/teacher", fit)
  accuracy = {arm: {} for arm in arms}
  for arm in arms:
    for recipe in grid:
      variables = train_arm(f"validation/{arm}/{recipe.slug}", arm, recipe, fit, teacher_vars)
      accuracy[arm][recipe.slug] = evaluate(variables, held_out)["accuracy"]
  chosen = {arm: max(grid, key=lambda r, a=arm: accuracy[a][r.slug]) for arm in arms}
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "validation.json"), {
        "train_examples": n, "validation_examples": config.tune.validation_examples,
        "grid": [dataclasses.asdict(r) | {"slug": r.slug} for r in grid],
        "accuracy": accuracy, "chosen": {arm: r.slug for arm, r in chosen.items()}})
  return chosen


def _jsonable(term: Term) -> dict:
  """A term as plain JSON (checkpoint metadata): tuples become lists."""
  return json.loads(json.dumps(dataclasses.asdict(term), default=list))
