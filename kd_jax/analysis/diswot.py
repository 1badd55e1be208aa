"""DisWOT: ranks candidate students for a teacher without training them.

    python -m kd_jax.analysis.diswot --teacher_workdir=/tmp/kd_digits \
        --student="mlp:hidden_sizes=(64,)" --student="digits_cnn_student:widths=(8, 16)"

scores each candidate, randomly initialised, against the teacher of a finished KD job on one
batch of the job's train split, prints the candidates best first and writes `diswot.json` to
`--out` (default: the teacher workdir). Without `--student`, the candidates are the digits
students of `benchmarks/digits_kd_experiments.py --experiment=capacity`. A candidate is
`model` or `model:kwarg=value, ...` (Python literals, as in `models.create_model`).

Score = −(semantic distance + relation distance), higher is better (0 for a copy of the
teacher). Each distance is SP's `‖G_t/‖G_t‖_rows − G_s/‖G_s‖_rows‖²_F / n²`
(`kd_jax.losses.similarity_preserving`) of a Gram matrix:

- relation: `G = F Fᵀ` `[B, B]` over the batch's `pre_logits` features (the classifier input);
- semantic: `G = A Aᵀ` `[K, K]` over the classes, where `A = (softmax(z) − y)ᵀ F / B` `[K, D]`
  is the gradient of the mean CE with respect to the classifier weight (`z = F W + b`), the
  per-class channel weights that DisWOT calls Grad-CAM.

Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR 2023. Reference: lliai/DisWOT-CVPR2023 (its README's `semantic_similarity_metric`,
`relation_similarity_metric`; `compute_diswot_procedure` sums the two). Departures:

- the reference's semantic metric compares the per-class `[D, D]` outer products of the fc
  gradient channel by channel (ICKD's `channel_similarity`), which needs equal teacher and
  student widths; the class-by-class `[K, D]·[K, D]ᵀ` Gram compares the same gradients across
  any widths and does not depend on how channels are ordered;
- the relation metric reads `pre_logits`, which is after global pooling in the pooled zoo
  models; the reference reads the map before pooling;
- the teacher is the job's trained teacher (`--random_teacher` re-initialises it, as the
  reference's experiments do); networks keep their own initialisers, not the
  reference's N(0, 1) weights; the score is the mean over `--inits` student initialisations
  (default 5; the reference draws one, which ranked the digits students worse:
  benchmarks/RESULTS.md); every candidate sees the same batch (the reference draws a new one
  per candidate).
"""
import ast
import dataclasses
import os

from absl import app, flags
import jax
import jax.numpy as jnp

from kd_jax import checkpoint, data, experiment, losses, models
from kd_jax.analysis import cka
from kd_jax.models import ModelOutput

# The capacity experiment's digits students (benchmarks/digits_kd_experiments.py STUDENTS).
DIGITS_STUDENTS = ("mlp:hidden_sizes=(16,)", "mlp:hidden_sizes=(32,)", "mlp:hidden_sizes=(64,)",
                   "mlp:hidden_sizes=(128,)", "digits_cnn_student:widths=(4, 8)",
                   "digits_cnn_student:widths=(8, 16)")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A zoo model and its `create_model` keyword arguments."""
  model: str
  kwargs: dict

  @classmethod
  def parse(cls, spec: str) -> "Candidate":
    """`"mlp:hidden_sizes=(64,)"` → `Candidate("mlp", {"hidden_sizes": (64,)})`."""
    model, _, args = spec.partition(":")
    try:
      call = ast.parse(f"f({args})", mode="eval").body
      if call.args:
        raise ValueError("positional argument")
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f"--student={spec!r} is not MODEL or MODEL:kwarg=value, ... with Python "
                       f"literal values, e.g. \"mlp:hidden_sizes=(64,)\" ({e})") from None
    return cls(model.strip(), kwargs)

  def __str__(self) -> str:
    return f"{self.model}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


def class_gradients(output: ModelOutput, labels: jax.Array) -> jax.Array:
  """`∂CE/∂W` `[K, D]` of the classifier `logits = pre_logits·W + b`, mean CE over the batch.

  Args:
    output: a model's output with `features["pre_logits"]` `[B, D]` and `logits` `[B, K]`.
    labels: `[B]` class ids or `[B, K]` soft labels.
  """
  logits = output.logits.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, logits.shape[-1]) if labels.ndim == 1 else labels
  features = output.features["pre_logits"].astype(jnp.float32)
  return (jax.nn.softmax(logits) - targets).T @ features / logits.shape[0]


@jax.jit
def distances(teacher: ModelOutput, student: ModelOutput, labels: jax.Array) -> dict:
  """DisWOT's `semantic` and `relation` distances (≥ 0; 0 for identical networks) and their
  `score` = −(semantic + relation), all float32 scalars."""
  semantic = losses.similarity_preserving(class_gradients(student, labels),
                                          class_gradients(teacher, labels))
  relation = losses.similarity_preserving(student.features["pre_logits"],
                                          teacher.features["pre_logits"])
  return {"score": -(semantic + relation), "semantic": semantic, "relation": relation}


def _random_output(exp, candidate: Candidate, field: str, images, key):
  """The output of `candidate` freshly initialised from `key` (train mode: BatchNorm on batch
  statistics, as the reference's untrained networks run), and its parameter count."""
  init_key, dropout_key = jax.random.split(key)
  apply_fn, variables, _ = exp.build(candidate.model, candidate.kwargs, field, init_key)
  output = jax.jit(apply_fn, static_argnames="train")(variables, images, train=True,
                                                      rngs={"dropout": dropout_key})[0]
  return output, models.count_params(variables["params"])


def rank(exp: experiment.Experiment, teacher, candidates: list[Candidate], *,
         examples: int = 64, seed: int = 0, inits: int = 5) -> list[dict]:
  """Scores `candidates` against the teacher of `exp`; best first.

  Args:
    exp: the teacher's KD job (`cka.workdir_experiment`).
    teacher: `(apply_fn, variables)` of the trained teacher (`cka.restore_stage`), or None for
      `exp.config.teacher.model` randomly initialised (from `seed`).
    candidates: the students.
    examples: train-split images of the one batch every network sees.
    seed: picks the batch and the initialisations.
    inits: student initialisations averaged per candidate.
  Returns:
    One dict per candidate: `student`, `params`, and the mean `score`, `semantic`, `relation`.
  """
  if examples < 2:
    raise ValueError(f"--examples={examples} must be at least 2 (relations compare examples)")
  if inits < 1:
    raise ValueError(f"--inits={inits} must be at least 1")
  batch = next(data.train_batches(exp.train_source, batch_size=examples, seed=seed,
                                  mean=exp.info.mean, std=exp.info.std, prefetch=0))
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  teacher_key, student_key = jax.random.split(cka.init_key(seed))
  if teacher is None:
    spec = exp.config.teacher
    teacher_output, _ = _random_output(exp, Candidate(spec.model, spec.model_kwargs.to_dict()),
                                       "teacher.model", images, teacher_key)
  else:
    teacher_output = jax.jit(teacher[0], static_argnames="train")(teacher[1], images,
                                                                  train=False)[0]
  rows = []
  for candidate in candidates:
    values = []
    for key in jax.random.split(student_key, inits):
      output, params = _random_output(exp, candidate, f"--student={candidate}", images, key)
      values.append(distances(teacher_output, output, labels))
    mean = {k: float(jnp.mean(jnp.stack([v[k] for v in values]))) for k in values[0]}
    rows.append({"student": str(candidate), "params": params, **mean})
  return sorted(rows, key=lambda r: -r["score"])


def run(teacher_workdir: str, students, *, examples: int = 64, seed: int = 0, inits: int = 5,
        random_teacher: bool = False, out: str | None = None) -> dict:
  """Ranks `students` (specs, see `Candidate.parse`) for the teacher of `teacher_workdir`;
  writes `<out>/diswot.json` (default `out`: the workdir) and returns what it holds."""
  candidates = [Candidate.parse(s) for s in students]
  exp = cka.workdir_experiment(teacher_workdir, "--teacher_workdir")
  teacher = None if random_teacher else cka.restore_stage(exp, teacher_workdir, "teacher",
                                                          "--teacher_workdir")
  rows = rank(exp, teacher, candidates, examples=examples, seed=seed, inits=inits)
  c = exp.config
  out = teacher_workdir if out is None else out
  result = {"teacher_workdir": os.path.abspath(teacher_workdir),
            "teacher": str(Candidate(c.teacher.model, c.teacher.model_kwargs.to_dict())),
            "teacher_init": "random" if random_teacher else "trained",
            "split": f"{c.data.name}:{c.data.train_split}", "examples": examples, "seed": seed,
            "inits": inits, "ranking": rows, "json": os.path.join(out, "diswot.json")}
  os.makedirs(out, exist_ok=True)
  checkpoint.atomic_write_json(result["json"], result)
  return result


def format_result(result: dict) -> str:
  """What the command prints: the settings, the ranking table (rank, student, parameters, score
  and its two distances) and the file written."""
  rows = result["ranking"]
  width = max(len("student"), *(len(r["student"]) for r in rows))
  lines = [f"DisWOT ranking for the {result['teacher_init']} teacher {result['teacher']} "
           f"({result['examples']} images of {result['split']}, seed {result['seed']}, "
           f"{result['inits']} init(s) per student; higher is better)",
           f"{'rank':>4}  {'student':<{width}} {'params':>8} {'score':>9} {'semantic':>9} "
           f"{'relation':>9}"]
  lines += [f"{i:>4}  {r['student']:<{width}} {r['params']:>8,} {r['score']:>9.4f} "
            f"{r['semantic']:>9.4f} {r['relation']:>9.4f}" for i, r in enumerate(rows, 1)]
  return "\n".join(lines + [f"wrote {result['json']}"])


def main(argv):
  f = flags.FLAGS
  cka.run_command(argv, lambda: run(f.teacher_workdir, f.student or DIGITS_STUDENTS,
                                    examples=f.examples, seed=f.seed, inits=f.inits,
                                    random_teacher=f.random_teacher, out=f.out), format_result)


if __name__ == "__main__":
  flags.DEFINE_string("teacher_workdir", None, "A finished KD job's workdir (its teacher).",
                      required=True)
  flags.DEFINE_multi_string("student", None, "A candidate, MODEL or MODEL:kwarg=value, ...; "
                            "repeat the flag (default: the digits capacity students).")
  flags.DEFINE_integer("examples", 64, "Train-split images of the batch (the reference's 64).")
  flags.DEFINE_integer("seed", 0, "Picks the batch and the initialisations.")
  flags.DEFINE_integer("inits", 5, "Random initialisations averaged per student (the "
                       "reference: 1).")
  flags.DEFINE_bool("random_teacher", False, "Score against a randomly initialised teacher.")
  flags.DEFINE_string("out", None, "Output directory (default: the teacher workdir).")
  app.run(main)
