"""Self-distillation: teacher-free USKD, and born-again generations guided by the ground truth.

`uskd` trains the student alone on

    ce_weight·CE(s, y) + weight·USKD(s, w, y),

USKD's normalised target term, Zipf non-target term and weak supervision of a linear head w on
an intermediate student feature (`losses.uskd`, the `Distiller`'s `uskd` term; Yang et al.,
"From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
Loss and Customized Soft Labels", ICCV 2023). The reference (yzd-v/cls_KD
`ClassificationDistiller`) likewise keeps the student's own cross-entropy next to `USKDLoss`.

`generations` are born-again networks (Furlanello et al., "Born-Again Neural Networks", ICML
2018): generation k has the student's architecture and minimises

    L_k = g_k·CE(s, y) + (1 − g_k)·T²·KL(softmax(t_{k−1}/T) ‖ softmax(s/T)),

t_{k−1} the logits of generation k − 1, frozen. The ground-truth weight g_k per generation is
Borup & Andersen's iterated self-distillation, whose targets mix the labels with the previous
fit ("Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by
Self-Distillation", NeurIPS 2021); with T = 1 the KL term has the gradient of their
cross-entropy on the previous model's probabilities. Generation 0 distils from `teacher` when
one is given (BAN's teacher), else it learns from the labels alone (g_0 = 1, their first fit).
`train_generations` trains them in order, each in its own stage directory
`<name>/gen_<k>`, so a killed sequence resumes like any stage.

Departures: the weights g_k are given, not estimated (Borup & Andersen derive the optimal weight
per step for kernel regression and estimate it for networks); every generation starts from the
same initial variables (BAN draws a fresh initialisation); BAN's ensemble of generations is not
built.
"""
import dataclasses
import math
from typing import Callable, Iterator, Mapping, Sequence

import optax

from kd_jax import trainer
from kd_jax.distiller import Distiller, Term

TEACHER = "teacher"  # the frozen network of every generation's KD term


def uskd(student: Callable, *, feature: str, ce_weight: float = 1.0, weight: float = 1.0,
         hparams: Mapping | None = None) -> Distiller:
  """Teacher-free USKD: a `Distiller` with CE and the `uskd` term, and no frozen network.

  Args:
    student: the student's apply function.
    feature: the student tap the weak head reads (`[B, ...]`, flattened), e.g. `"stage2"`.
    ce_weight, weight: the weights of CE and of the USKD term.
    hparams: `losses.uskd`'s α, β, μ (its defaults otherwise).

  State: `trainable = {"student", "uskd": the weak head}`, `frozen = {}`.
  """
  return Distiller(student, [Term("ce", weight=ce_weight),
                             Term("uskd", weight=weight, student=feature,
                                  hparams=dict(hparams or {}))], teachers={})


def uskd_stage(name: str, student: tuple[Callable, dict], *, feature: str,
               tx: optax.GradientTransformation, num_steps: int, metadata: dict | None = None,
               **uskd_kwargs) -> trainer.Stage:
  """A `trainer.Stage` training `uskd(student[0], feature=feature, **uskd_kwargs)` from
  `student = (apply_fn, variables)`."""
  metadata = {**(metadata or {}), "regime": "uskd", "feature": feature}
  return trainer.Stage(name, uskd(student[0], feature=feature, **uskd_kwargs),
                       {"student": student[1]}, metadata, tx, num_steps)


def generations(student: tuple[Callable, dict], gt_weights: Sequence[float], *,
                tx: optax.GradientTransformation, num_steps: int,
                teacher: tuple[Callable, dict] | None = None, temperature: float = 1.0,
                name: str = "born_again", metadata: dict | None = None) -> list[trainer.Stage]:
  """One `trainer.Stage` per generation (see the module docstring), to run with
  `train_generations`.

  Args:
    student: `(apply_fn, variables)`: the architecture and initial variables of every
      generation.
    gt_weights: `[K]` ground-truth weights g_k ∈ [0, 1], one per generation; the KD term
      weighs 1 − g_k.
    tx, num_steps: each generation's optimizer and number of steps.
    teacher: `(apply_fn, variables)` generation 0 distils from; without it g_0 must be 1.
    temperature: T of the KD terms (1: Borup & Andersen's targets, BAN's).
    name: the stages are `<name>/gen_<k>`, sub-directories of the workdir.

  Returns:
    `K` stages training `Distiller`s with terms `ce` (weight g_k) and, when there is a teacher,
    `kd` (weight 1 − g_k) against the frozen network "teacher". For k ≥ 1 that network has the
    student's apply function and `variables["teacher"]` is None until `train_generations` sets
    it to generation k − 1's result.
  """
  gt_weights = list(gt_weights)
  if not gt_weights:
    raise ValueError("born_again: gt_weights is empty; give one ground-truth weight per "
                     "generation, e.g. [1.0, 0.5, 0.5]")
  for k, g in enumerate(gt_weights):
    if not (math.isfinite(g) and 0 <= g <= 1):
      raise ValueError(f"born_again: gt_weights[{k}] must be in [0, 1], got {g}")
  if teacher is None and gt_weights[0] != 1:
    raise ValueError(f"born_again: gt_weights[0] is {gt_weights[0]} but generation 0 has no "
                     "teacher; give teacher=(apply_fn, variables) or gt_weights[0] = 1")
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"born_again: temperature must be > 0, got {temperature}")
  stages = []
  for k, g in enumerate(gt_weights):
    terms, teachers, variables = [Term("ce", weight=g)], {}, {"student": student[1]}
    if k or teacher is not None:
      terms.append(Term("kd", weight=1.0 - g, hparams={"temperature": temperature}))
      teachers[TEACHER] = student[0] if k else teacher[0]
      variables[TEACHER] = None if k else teacher[1]
    stage_metadata = {**(metadata or {}), "regime": "born_again", "generation": k,
                      "gt_weight": g, "temperature": temperature}
    stages.append(trainer.Stage(f"{name}/gen_{k}", Distiller(student[0], terms, teachers),
                                variables, stage_metadata, tx, num_steps))
  return stages


def train_generations(stages: Sequence[trainer.Stage], workdir: str,
                      train_batches: Callable[[int], Iterator[dict]],
                      options: trainer.LoopOptions) -> list[dict]:
  """Trains `generations(...)` in order through `trainer.train`, generation k ≥ 1 distilling
  from generation k − 1's returned variables.

  Each generation resumes from its own stage directory: a rerun restores the finished
  generations from their last checkpoint and resumes the interrupted one.

  Returns:
    Each generation's final variables `{"params", **model_state}`.
  """
  results = []
  for k, stage in enumerate(stages):
    if k:
      stage = dataclasses.replace(stage, variables={**stage.variables, TEACHER: results[-1]})
    results.append(trainer.train(stage, workdir, train_batches, options))
  return results
