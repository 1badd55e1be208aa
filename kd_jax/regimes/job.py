"""The regimes job: each teacher–student regime of `kd_jax.regimes`, a config away.

`run(config, workdir)` reads `config.regime.name` and trains, on the general step through
`kd_jax.trainer` (every stage resumable, checkpointed and logged like the KD job's):

- `multi_teacher`: each of `regime.teachers` (stage `teacher_<name>`, or restored from its
  `checkpoint`), then the student from all of them (MEAL V2 averaging with `regime.weights`,
  equal if empty; `regime.discriminator_weight` > 0 adds MEAL V2's discriminator; `regime.balance
  = "mtard"` adapts weights and temperatures in the step);
- `mutual`: the student and `regime.peers` trained together (DML; `regime.compact` names the
  network trained with BD-KD's balanced divergence);
- `born_again`: generations of the student, generation k teaching k + 1, with ground-truth
  weights `regime.gt_weights`;
- `uskd`: the student alone with USKD's teacher-free soft labels on its feature `regime.feature`;
- `tgeo`: the teacher (`config.teacher`), then the student with TGeo-KD's per-example fusion,
  the fusion network fitted to the last `regime.heldout_examples` train examples;
- `mean_teacher`: a stratified `regime.labeled_fraction` of train keeps its labels, the rest is
  unlabeled; the student learns from both with its EMA teacher's pseudo-labels, and is compared
  with the same student trained on the labeled part alone (`student_labeled_only`), for the
  same number of steps;
- `label_free`: the student network pre-trained on the train images without labels (DINO-style
  EMA teacher), then linear probes (ridge, on `regime.probe_fraction` of the train labels) of
  the random-init, the pre-trained student and the teacher backbones;

and, unless `student.baseline` is off, the student alone with cross-entropy on the same data
and recipe (`student_baseline`). Returns one row per evaluated network (test accuracy), the
same rows `experiment.format_table` prints for the KD job.
"""
import os

import jax
import numpy as np

from kd_jax import checkpoint, data, experiment, models, trainer
from kd_jax.distiller import Term, supervised
from kd_jax.regimes import label_free, mean_teacher, multi_teacher, mutual, self_distill, tgeo


class _Run:
  """One regimes run: the experiment, the student, its recipe, and the rows evaluated so far."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.exp = experiment.Experiment(config)
    self.options = self.exp.options
    self.rng = jax.random.PRNGKey(config.seed)
    apply_fn, variables, self.student_meta = self.build(config.student, "student")
    self.student = (apply_fn, variables)
    self.rows = []

  def build(self, model_config, field: str):
    """`(apply_fn, variables, metadata)` of `model_config.model`/`model_kwargs`."""
    self.rng, rng = jax.random.split(self.rng)
    kwargs = model_config.model_kwargs
    return self.exp.build(model_config.model, kwargs.to_dict() if hasattr(kwargs, "to_dict")
                          else dict(kwargs), f"{field}.model", rng)

  def recipe(self, crop_padding: int, num_epochs: int) -> str:
    return str(experiment.Recipe(crop_padding, self.config.optim.learning_rate, num_epochs))

  def student_tx(self, num_examples: int):
    return self.exp.make_tx(self.config.optim.learning_rate, self.config.student.num_epochs,
                            num_examples)

  def student_batches(self, source=None):
    return self.exp.train_batches(self.exp.train_source if source is None else source,
                                  self.config.seed + 1, self.config.data.crop_padding)

  def add_row(self, stage: str, apply_fn, variables, metadata: dict, recipe: str | None = None):
    self.rows.append({"stage": stage, "model": metadata["model"],
                      "recipe": recipe or self.recipe(self.config.data.crop_padding,
                                                      self.config.student.num_epochs),
                      "params": models.count_params(variables["params"]),
                      **self.exp.evaluate(apply_fn, variables)})

  def train(self, stage: trainer.Stage, batches=None) -> dict:
    return trainer.train(stage, self.workdir, batches or self.student_batches(), self.options)

  def teacher(self, name: str, teacher_config, field: str):
    """A teacher trained as stage `name` (or restored from `teacher_config.checkpoint`) and
    its row; returns `(apply_fn, variables)`."""
    apply_fn, variables, meta = self.build(teacher_config, field)
    crop = teacher_config.get("crop_padding", self.config.regime.teacher_crop_padding)
    if teacher_config.get("checkpoint"):
      variables = checkpoint.restore_variables(teacher_config.checkpoint, meta, variables)
      recipe = f"restored from {teacher_config.checkpoint}"
    else:
      tx, steps = self.exp.make_tx(self.config.optim.learning_rate, self.config.teacher.num_epochs,
                                   len(self.exp.train_source))
      variables = self.train(trainer.Stage(name, supervised(apply_fn), {"student": variables},
                                           meta, tx, steps),
                             self.exp.train_batches(self.exp.train_source, self.config.seed, crop))
      recipe = self.recipe(crop, self.config.teacher.num_epochs)
    self.add_row(name, apply_fn, variables, meta, recipe)
    return apply_fn, variables

  def final_state(self, stage: trainer.Stage, batches):
    return trainer.final_state(stage, self.workdir, next(batches(0)), self.config.seed)


def _multi_teacher(run: _Run):
  r = run.config.regime
  if not r.teachers:
    raise ValueError("regime.teachers is empty; give at least one {name: {model, model_kwargs, "
                     "checkpoint}}, e.g. the digits CNN teacher")
  if r.balance not in ("none", "mtard"):
    raise ValueError(f"regime.balance={r.balance!r} is unknown; valid: none, mtard")
  terms = [Term("ce", weight=r.ce_weight)]
  if r.discriminator_weight:  # MEAL V2's discriminator on the teachers' mean logits
    terms.append(Term("meal_v2_discriminator", weight=r.discriminator_weight,
                      teacher_name=tuple(r.teachers)))
  settings = dict(balance=multi_teacher.MTARDBalance() if r.balance == "mtard" else None,
                  temperature=r.temperature, kd_weight=r.kd_weight, weights=r.weights or None,
                  terms=terms)
  multi_teacher.MultiTeacher(run.student[0], dict.fromkeys(r.teachers), **settings)  # checks
  teachers = {name: run.teacher(f"teacher_{name}", t, f"regime.teachers.{name}")
              for name, t in r.teachers.items()}
  tx, steps = run.student_tx(len(run.exp.train_source))
  variables = run.train(multi_teacher.stage(
      "student_multi_teacher", run.student, teachers, tx=tx, num_steps=steps,
      metadata=run.student_meta, **settings))
  run.add_row("student_multi_teacher", run.student[0], variables, run.student_meta)


def _mutual(run: _Run):
  r = run.config.regime
  if not r.peers:
    raise ValueError("regime.peers is empty; give at least one {name: {model, model_kwargs}} to "
                     "train with the student")
  networks = {"student": run.student}
  for name, peer in r.peers.items():
    apply_fn, variables, _ = run.build(peer, f"regime.peers.{name}")
    networks[name] = (apply_fn, variables)
  tx, steps = run.student_tx(len(run.exp.train_source))
  stage = mutual.stage("mutual", networks, tx=tx, num_steps=steps, metadata=run.student_meta,
                       temperature=r.temperature, compact=r.compact or None)
  run.train(stage)
  state = run.final_state(stage, run.student_batches())
  for name, (apply_fn, _) in networks.items():
    variables = mutual.network_variables(state, name)
    run.add_row(f"mutual/{name}", apply_fn, variables,
                {"model": r.peers[name].model if name != "student" else run.student_meta["model"]})


def _born_again(run: _Run):
  r = run.config.regime
  tx, steps = run.student_tx(len(run.exp.train_source))
  stages = self_distill.generations(run.student, r.gt_weights, tx=tx, num_steps=steps,
                                    temperature=r.temperature, metadata=run.student_meta)
  for stage, variables in zip(stages, self_distill.train_generations(
      stages, run.workdir, run.student_batches(), run.options)):
    run.add_row(stage.name, run.student[0], variables, run.student_meta)


def _uskd(run: _Run):
  r = run.config.regime
  tx, steps = run.student_tx(len(run.exp.train_source))
  variables = run.train(self_distill.uskd_stage("student_uskd", run.student, feature=r.feature,
                                                tx=tx, num_steps=steps,
                                                metadata=run.student_meta))
  run.add_row("student_uskd", run.student[0], variables, run.student_meta)


def _tgeo(run: _Run):
  r = run.config.regime
  fit, heldout = run.exp.split_train(r.heldout_examples, "regime.heldout_examples")
  teacher = run.teacher("teacher", run.config.teacher, "teacher")
  fit_batches = run.student_batches(fit)
  heldout_batches = run.exp.train_batches(heldout, run.config.seed + 2, 0)

  def batches(start):
    return map(tgeo.attach_heldout, fit_batches(start), heldout_batches(start))

  tx, steps = run.student_tx(len(fit))
  variables = run.train(tgeo.stage("student_tgeo", run.student, teacher, tx=tx, num_steps=steps,
                                   metadata=run.student_meta, lookahead_lr=r.lookahead_lr,
                                   temperature=r.temperature), batches)
  run.add_row("student_tgeo", run.student[0], variables, run.student_meta)


def _train_arrays(run: _Run) -> tuple[np.ndarray, np.ndarray]:
  source = run.exp.train_source
  return (source.images, source.labels) if isinstance(source, data.ArrayDataSource) else (
      data.gather(source, np.arange(len(source))))


def _mean_teacher(run: _Run):
  r = run.config.regime
  images, labels = _train_arrays(run)
  tx, steps = run.student_tx(len(images))  # as many steps as the student alone on all labels
  labeled, _ = mean_teacher.split_labeled(labels, r.labeled_fraction, seed=run.config.seed)
  if len(labeled) < run.config.data.batch_size:
    raise ValueError(f"regime.labeled_fraction={r.labeled_fraction} keeps {len(labeled)} labeled "
                     f"examples, fewer than data.batch_size={run.config.data.batch_size}")
  batches = mean_teacher.semi_supervised_batches(
      images, labels, labeled_fraction=r.labeled_fraction, batch_size=run.config.data.batch_size,
      unlabeled_batch_size=r.unlabeled_batch_size, seed=run.config.seed,
      augment=data.AugmentConfig(crop_padding=run.config.data.crop_padding), mean=run.exp.info.mean,
      std=run.exp.info.std, **run.exp.process)
  stage = mean_teacher.stage(  # checks the regime's fields before anything trains
      "mean_teacher", run.student, tx=tx, num_steps=steps, metadata=run.student_meta,
      decay=r.decay, momentum_warmup=r.momentum_warmup, threshold=r.threshold,
      low_threshold=r.low_threshold if r.low_threshold >= 0 else None,
      score_weighting=r.score_weighting, unlabeled_weight=r.unlabeled_weight,
      rampup_steps=int(r.rampup_fraction * steps))
  labeled_only = run.train(
      trainer.Stage("student_labeled_only", supervised(run.student[0]),
                    {"student": run.student[1]}, run.student_meta, tx, steps),
      run.student_batches(data.subset(run.exp.train_source, labeled)))
  run.add_row("student_labeled_only", run.student[0], labeled_only, run.student_meta)
  variables = run.train(stage, batches)
  run.add_row("mean_teacher/student", run.student[0], variables, run.student_meta)
  run.add_row("mean_teacher/teacher", run.student[0], mean_teacher.teacher_variables(
      run.final_state(stage, batches)), run.student_meta)


def _label_free(run: _Run):
  r = run.config.regime
  tx, steps = run.student_tx(len(run.exp.train_source))
  stage = label_free.stage("label_free", run.student, tx=tx, num_steps=steps,
                           metadata=run.student_meta, tap=r.tap, out_dim=r.out_dim,
                           hidden_dim=r.hidden_dim, bottleneck_dim=r.bottleneck_dim,
                           momentum=r.momentum, strategy=r.strategy)
  variables = run.train(stage)
  teacher = label_free.teacher_backbone(run.final_state(stage, run.student_batches()))
  images, labels = _train_arrays(run)
  probe_rows = data.stratified_fraction(labels, r.probe_fraction, run.config.seed)
  normalize = lambda x: data.normalize(x, run.exp.info.mean, run.exp.info.std)  # noqa: E731
  train = (normalize(images[probe_rows]), labels[probe_rows])
  test_images, test_labels = data.gather(run.exp.eval_source, np.arange(len(run.exp.eval_source)))
  test = (normalize(test_images), test_labels)
  for name, backbone in (("random_init", run.student[1]), ("student", variables),
                         ("teacher", teacher)):
    features = jax.jit(lambda x, v=backbone: run.student[0](v, x, train=False)[0].features[r.tap])
    accuracy = label_free.linear_probe(features, train, test)
    run.rows.append({"stage": f"label_free/probe_{name}", "model": run.student_meta["model"],
                     "recipe": f"ridge probe on {100 * r.probe_fraction:g}% of train labels",
                     "params": models.count_params(backbone["params"]), "accuracy": accuracy,
                     "count": len(test_labels)})


REGIMES = {"multi_teacher": _multi_teacher, "mutual": _mutual, "born_again": _born_again,
           "uskd": _uskd, "tgeo": _tgeo, "mean_teacher": _mean_teacher,
           "label_free": _label_free}


def run(config, workdir: str) -> list[dict]:
  """Runs `config.regime.name` (see the module docstring) in `workdir`; returns its rows."""
  if config.regime.name not in REGIMES:
    raise ValueError(f"regime.name={config.regime.name!r} is unknown; valid: "
                     f"{', '.join(REGIMES)}")
  os.makedirs(workdir, exist_ok=True)
  run_ = _Run(config, workdir)
  REGIMES[config.regime.name](run_)  # first: bad regime fields fail before anything trains
  if config.student.baseline:
    tx, steps = run_.student_tx(len(run_.exp.train_source))
    variables = run_.train(trainer.Stage("student_baseline", supervised(run_.student[0]),
                                         {"student": run_.student[1]}, run_.student_meta, tx,
                                         steps))
    run_.add_row("student_baseline", run_.student[0], variables, run_.student_meta)
    run_.rows.insert(0, run_.rows.pop())
  if jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), run_.rows)
  return run_.rows
