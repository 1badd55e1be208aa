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

Compression (configs/digits_compression.py): with `student.quantize.bits = k` both student arms
train k-bit weights in their forward pass with full-precision shadows (`kd_jax.quantization`,
Polino et al. 2018); their rows report the quantized model, its size in bits and the shadows'
accuracy, and each arm's stage directory holds `quantized.npz`. With `data.prune.fraction = f`
the students' transfer set loses the fraction f of its examples by a score (`kd_jax.data.pruning`:
random, or EL2N / forgetting from short runs of the teacher's architecture on that set); the
teacher still trains on all of train, as in Ben-Baruch et al. 2024. Validation tuning runs under
the same conditions: quantized arms, and a transfer set pruned by its own scores.

Every stage resumes from its own checkpoints, so rerunning with the same workdir continues
where a killed run stopped, and a finished stage is restored, not retrained.
"""
import dataclasses
import io
import itertools
import json
import os

import jax
import numpy as np
import optax

from kd_jax import (checkpoint, class_bias, data, experiment, models, quantization,
                    teacher_cache, trainer)
from kd_jax.data import pruning
from kd_jax.distiller import Distiller, Term, supervised


def distill_terms(config) -> list[Term]:
  """`config.distill.terms` (a sequence of dicts) as `Term` objects, errors naming the entry."""
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


def student_quantizer(config) -> quantization.Quantizer | None:
  """The students' `Quantizer` from `config.student.quantize` (None when `bits` is 0)."""
  q = config.student.quantize
  if not q.bits:
    return None
  if q.method not in quantization.METHODS:
    raise ValueError(f"student.quantize.method={q.method!r} is unknown; valid: "
                     f"{', '.join(quantization.METHODS)}")
  if q.method == "differentiable" and not q.points_learning_rate > 0:
    raise ValueError(f"student.quantize.points_learning_rate must be > 0, got "
                     f"{q.points_learning_rate}")
  try:
    return quantization.Quantizer(q.bits, q.bucket_size, q.full_precision,
                                  q.method == "differentiable")
  except ValueError as e:
    raise ValueError(f"student.quantize: {e}") from None


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
  p = config.data.prune
  if not 0 <= p.fraction < 1:
    raise ValueError(f"data.prune.fraction must be in [0, 1) (0: no pruning), got {p.fraction}")
  if p.score not in pruning.SCORES:
    raise ValueError(f"data.prune.score={p.score!r} is unknown; valid: {', '.join(pruning.SCORES)}")
  if p.keep not in pruning.SIDES:
    raise ValueError(f"data.prune.keep={p.keep!r} is unknown; valid: {', '.join(pruning.SIDES)}")
  for field in ("score_epochs", "score_runs"):
    if p[field] < 1:
      raise ValueError(f"data.prune.{field} must be >= 1, got {p[field]}")
  student_quantizer(config)


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

  # A transfer set pruned below one batch (the validation side's is smaller) fails now.
  n = min(len(transfer_set(train_source)),
          len(transfer_set(validation_split[0])) if config.tune.validation_examples else np.inf)
  if pruning.num_kept(n, config.data.prune.fraction) < config.data.batch_size:
    raise ValueError(f"data.prune.fraction={config.data.prune.fraction} keeps "
                     f"{pruning.num_kept(n, config.data.prune.fraction)} of the {n} examples the "
                     f"students train on, fewer than data.batch_size={config.data.batch_size}; "
                     "lower one of them")

  rng_teacher, rng_student = jax.random.split(jax.random.PRNGKey(config.seed))
  teacher_apply, teacher_init, teacher_meta = exp.build(
      config.teacher.model, config.teacher.model_kwargs.to_dict(), "teacher.model", rng_teacher)
  student_apply, student_init, student_meta = exp.build(
      config.student.model, config.student.model_kwargs.to_dict(), "student.model", rng_student)
  terms = distill_terms(config)
  kd_meta = {**student_meta, "teacher": teacher_meta, "terms": [_jsonable(t) for t in terms]}
  cached = ("teacher",) if config.teacher.cache else ()  # its logits come from teacher_cache
  arms = {"student_kd": (lambda n: Distiller(student_apply, terms, {"teacher": teacher_apply},
                                             num_data=n, cached=cached), kd_meta)}
  if config.student.baseline:
    arms = {"student_baseline": (lambda n: supervised(student_apply), student_meta), **arms}
  quantizer, part_tx = student_quantizer(config), {}
  if quantizer is not None:
    arms = {arm: (lambda n, make=make: quantization.Quantized(make(n), quantizer),
                  {**meta, "quantize": dataclasses.asdict(quantizer)})
            for arm, (make, meta) in arms.items()}
    if quantizer.learned_points:  # Polino et al.'s optimizer of the points
      part_tx = {quantization.POINTS: optax.sgd(config.student.quantize.points_learning_rate,
                                                momentum=0.9, nesterov=True)}
  check_batches = exp.train_batches(transfer_set(train_source), config.seed, 0)
  if cached:
    check_batches = teacher_cache.with_placeholder(check_batches, config.teacher.cache,
                                                   exp.info.num_classes)
  # Fails at start-up, not after the teacher has trained, on bad taps, shapes or hparams.
  trainer.check_stage(trainer.Stage("student_kd", arms["student_kd"][0](len(train_source)),
                                    {"student": student_init, "teacher": teacher_init}, {},
                                    exp.make_tx(grid[0].learning_rate, 1, len(train_source))[0],
                                    1, part_tx),
                      check_batches, config.seed)
  options = exp.options

  def train_teacher(name, source):
    source = teacher_set(source)
    tx, steps = exp.make_tx(config.optim.learning_rate, config.teacher.num_epochs, len(source))
    return trainer.train(trainer.Stage(
        name, supervised(teacher_apply), {"student": teacher_init}, teacher_meta, tx, steps),
        workdir, exp.train_batches(source, config.seed, config.data.crop_padding), options)

  def students_set(source, prefix):
    """The transfer set of `source` without its pruned examples (`data.prune`)."""
    source, p = transfer_set(source), config.data.prune
    if not p.fraction:
      return source
    if p.score == "random":
      scores = pruning.random_scores(len(source), config.seed)
    else:
      scores = pruning.scores(p.score, _scoring_logits(config, exp, workdir, source, prefix),
                              data.class_ids(source))
    return pruning.prune(source, scores, p.fraction, p.keep, config.seed)

  def train_arm(name, arm, recipe, source, teacher_vars):
    """Trains `arm` on the students' set `source`; returns its variables as evaluated
    (quantized with `student.quantize`) and its full-precision shadows (None unquantized)."""
    make_method, meta = arms[arm]
    tx, steps = exp.make_tx(recipe.learning_rate, recipe.num_epochs, len(source))
    batches = exp.train_batches(source, config.seed + 1, recipe.crop_padding)
    if cached and arm == "student_kd":
      batches = cached_batches(name, recipe, source, batches, teacher_vars)
    stage = trainer.Stage(name, make_method(len(source)),
                          {"student": student_init, "teacher": teacher_vars},
                          {**meta, "recipe": dataclasses.asdict(recipe)}, tx, steps, part_tx)
    variables = trainer.train(stage, workdir, batches, options)
    if quantizer is None:
      return variables, None
    points = (trainer.final_state(stage, workdir, next(batches(0)), options.seed).trainable[
        quantization.POINTS] if quantizer.learned_points else None)
    if jax.process_index() == 0:
      quantization.export(os.path.join(workdir, name, "quantized.npz"), quantizer,
                          variables["params"], points)
    return {**variables, "params": quantizer(variables["params"], points)}, variables

  def cached_batches(name, recipe, source, batches, teacher_vars):
    """`batches` with the teacher's logits from its cache; the validation recipes with the same
    shifts read one cache (their batches differ only in length), sized for the longest."""
    scope = name.split("/")[0]  # "validation" or the arm
    epochs = (max(r.num_epochs for r in grid if r.crop_padding == recipe.crop_padding)
              if scope == "validation" else recipe.num_epochs)
    cache = teacher_cache.build(
        os.path.join(workdir, "teacher_cache", scope, f"crop{recipe.crop_padding}"), batches,
        teacher_apply, teacher_vars, storage=config.teacher.cache,
        num_steps=epochs * data.steps_per_epoch(len(source), config.data.batch_size),
        metadata={"teacher": teacher_meta, "precision": config.precision,
                  "data": {"name": config.data.name, "split": config.data.train_split,
                           "examples": len(source)},
                  "seed": config.seed + 1, "batch_size": config.data.batch_size,
                  "augment": {"crop_padding": recipe.crop_padding, "flip": config.data.flip}})
    return teacher_cache.with_teacher_logits(batches, cache)

  # A restored teacher is checked before anything trains.
  teacher_vars = (checkpoint.restore_variables(config.teacher.checkpoint, teacher_meta,
                                               teacher_init) if config.teacher.checkpoint else None)
  chosen = {arm: grid[0] for arm in arms}
  if config.tune.validation_examples:
    chosen = _tune(config, workdir, grid, list(arms), validation_split,
                   students_set(validation_split[0], "validation/"), train_teacher, train_arm,
                   lambda variables, source: exp.evaluate(student_apply, variables, source))

  results = []

  def finish(name, apply_fn, variables, meta, recipe, shadows=None):
    row = {"stage": name, "model": meta["model"], "recipe": recipe,
           "params": models.count_params(variables["params"]),
           "bits": (quantization.model_bits(variables["params"]) if shadows is None
                    else quantizer.size_bits(variables["params"])),
           **exp.evaluate(apply_fn, variables)}
    if shadows is not None:
      row["full_precision_accuracy"] = exp.evaluate(apply_fn, shadows)["accuracy"]
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
  students = students_set(train_source, "")
  for arm in arms:
    variables, shadows = train_arm(arm, arm, chosen[arm], students, teacher_vars)
    finish(arm, student_apply, variables, student_meta, str(chosen[arm]), shadows)
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results


def _tune(config, workdir, grid, arms, validation_split, students, train_teacher, train_arm,
          evaluate):
  """Trains every arm with every recipe of `grid` on `students`, its transfer set of train minus
  the last `tune.validation_examples` examples (with a teacher trained on that part too),
  evaluates on those examples, writes `validation.json` and returns each arm's best recipe (the
  first of equals)."""
  fit, held_out = validation_split
  n = len(fit)
  teacher_vars = train_teacher("validation/teacher", fit)
  accuracy = {arm: {} for arm in arms}
  for arm in arms:
    for recipe in grid:
      variables, _ = train_arm(f"validation/{arm}/{recipe.slug}", arm, recipe, students,
                               teacher_vars)
      accuracy[arm][recipe.slug] = evaluate(variables, held_out)["accuracy"]
  chosen = {arm: max(grid, key=lambda r, a=arm: accuracy[a][r.slug]) for arm in arms}
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "validation.json"), {
        "train_examples": n, "validation_examples": config.tune.validation_examples,
        "grid": [dataclasses.asdict(r) | {"slug": r.slug} for r in grid],
        "accuracy": accuracy, "chosen": {arm: r.slug for arm, r in chosen.items()}})
  return chosen


def _scoring_logits(config, exp, workdir, source, prefix) -> np.ndarray:
  """`[runs, epochs, N, C]` logits on `source` of `data.prune.score_runs` short runs of the
  teacher's architecture (`data.prune.score_epochs` epochs, the teacher's recipe), after each
  epoch for forgetting and after the last for EL2N. Run r is the stage
  `<prefix>prune_scores/run<r>`; each epoch's logits are kept there (`logits_epoch<e>.npy`), so
  a rerun reuses them."""
  p = config.data.prune
  epochs = range(1, p.score_epochs + 1) if p.score == "forgetting" else [p.score_epochs]
  tx, steps = exp.make_tx(config.optim.learning_rate, p.score_epochs, len(source))
  runs = []
  for run in range(p.score_runs):
    name = f"{prefix}prune_scores/run{run}"
    apply_fn, init, meta = exp.build(config.teacher.model, config.teacher.model_kwargs.to_dict(),
                                     "teacher.model", jax.random.PRNGKey(config.seed + 2 + run))
    logits = []
    for epoch in epochs:
      path = os.path.join(workdir, name, f"logits_epoch{epoch}.npy")
      if not os.path.exists(path):
        variables = trainer.train(
            trainer.Stage(name, supervised(apply_fn), {"student": init}, meta, tx,
                          steps * epoch // p.score_epochs), workdir,
            exp.train_batches(source, config.seed + 2 + run, config.data.crop_padding),
            exp.options)
        values = trainer.predict(apply_fn, variables, exp.eval_batches(source),
                                 exp.options.mesh_axes)[0]
        if jax.process_index() == 0:
          buffer = io.BytesIO()
          np.save(buffer, values)
          checkpoint.atomic_write(path, buffer.getvalue())
        logits.append(values)
      else:
        logits.append(np.load(path))
    runs.append(logits)
  return np.asarray(runs)


def _jsonable(term: Term) -> dict:
  """A term as plain JSON (checkpoint metadata): tuples become lists."""
  return json.loads(json.dumps(dataclasses.asdict(term), default=list))
