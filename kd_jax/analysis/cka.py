"""Linear CKA between every teacher layer and every student layer of a finished KD job.

    python -m kd_jax.analysis.cka --workdir=/tmp/kd_digits --stage=student_kd --examples=500

restores the teacher and the `--stage` student from the workdir's checkpoints (the models are
read from its `config.json`, so no config flag is needed), runs both on the first `--examples`
images of the eval split and writes `cka_<stage>.png` (the heatmap) and `cka_<stage>.json`
(the matrix and the tap names) to `--out` (default: the workdir). Rows are the teacher's taps,
columns the student's, each a model feature (`ModelOutput.features`, maps flattened per
example) or `logits`.

Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019 (linear
CKA, `kd_jax.losses.linear_cka`).
"""
import json
import os
import sys
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoint, data, experiment, losses
from kd_jax import workdir as workdir_lib
from kd_jax.models import ModelOutput

# Annotate the heatmap's cells with their values up to this many cells.
MAX_ANNOTATED_CELLS = 150


def workdir_experiment(workdir: str, field: str = "--workdir") -> experiment.Experiment:
  """The `Experiment` of the KD job whose `config.json` is in `workdir`; errors name `field`."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{field}={workdir} holds no {workdir_lib.CONFIG_FILE}; give the workdir "
                     "of a KD job (python -m kd_jax.main --config=configs/digits_kd.py "
                     "--workdir=DIR)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("job") != "kd":
    raise ValueError(f"{field}={workdir} is a {config.get('job')!r} job's workdir; these "
                     "analyses read the workdirs of KD jobs (config.job='kd')")
  return experiment.Experiment(config)


def stages(workdir: str) -> list[str]:
  """The stages of `workdir` that have checkpoints (`teacher`, `validation/student_kd/...`)."""
  found = [os.path.relpath(root, workdir) for root, dirs, _ in os.walk(workdir)
           if "checkpoints" in dirs]
  return sorted(found)


def restore_stage(exp: experiment.Experiment, workdir: str, stage: str, field: str = "--stage"):
  """`(apply_fn, variables)` of `stage`'s latest checkpoint in `workdir`.

  A stage named `teacher` (or `.../teacher`) holds `exp.config.teacher.model`, any other the
  student's. A teacher that the job restored from `teacher.checkpoint` is read from there.
  """
  role = "teacher" if stage.rsplit("/", 1)[-1] == "teacher" else "student"
  path = os.path.join(workdir, stage, "checkpoints")
  if role == "teacher" and not os.path.isdir(path) and exp.config.teacher.checkpoint:
    path = exp.config.teacher.checkpoint
  if not os.path.isdir(path):
    raise ValueError(f"{field}: {workdir} has no checkpoints of the {stage!r} stage; finish its "
                     f"job, or choose a stage with checkpoints: {', '.join(stages(workdir))}")
  group = exp.config[role]
  apply_fn, init, metadata = exp.build(group.model, group.model_kwargs.to_dict(),
                                       f"{role}.model", init_key(0))
  return apply_fn, checkpoint.restore_variables(path, metadata, init, field=field)


def init_key(seed: int) -> jax.Array:
  """A PRNG key for initialising networks: the "rbg" implementation compiles model inits 3–6×
  faster than threefry on CPU (digits CNNs: about 1 s against 3–6 s)."""
  return jax.random.key(seed, impl="rbg")


def taps(output: ModelOutput) -> dict[str, jax.Array]:
  """A model's named features followed by its `logits`, each `[B, ...]`."""
  return {**output.features, "logits": output.logits}


def cka_matrix(teacher_taps: dict[str, jax.Array],
               student_taps: dict[str, jax.Array]) -> np.ndarray:
  """Linear CKA of every (teacher tap, student tap) pair on one batch.

  Args:
    teacher_taps: `{name: [B, ...]}` (maps are flattened per example to `[B, D]`).
    student_taps: `{name: [B, ...]}`, the same examples.
  Returns:
    float64 `[len(teacher_taps), len(student_taps)]`, values in [0, 1].
  """
  return np.asarray(_cka_matrix(list(teacher_taps.values()), list(student_taps.values())),
                    np.float64)


@jax.jit
def _cka_matrix(teacher_taps: list, student_taps: list):
  """One program for every pair (each tap's Gram matrix is computed once). Lists, not dicts:
  jit would reorder a dict's keys."""
  return jnp.stack([jnp.stack([losses.linear_cka(t, s) for s in student_taps])
                    for t in teacher_taps])


def save_heatmap(path: str, matrix: np.ndarray, teacher_names, student_names, *,
                 title: str = "") -> None:
  """A PNG heatmap of `matrix` `[teacher taps, student taps]` on [0, 1], axes labelled with the
  tap names; each cell shows its value when there are at most `MAX_ANNOTATED_CELLS`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  rows, cols = matrix.shape
  # A Figure without pyplot: no backend is switched, so a notebook's own plots still show.
  fig = Figure(figsize=(max(4.8, 2.2 + 0.8 * cols), 1.6 + 0.5 * rows))
  ax = fig.subplots()
  image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  ax.set_xticks(range(cols), student_names, rotation=30, ha="right")
  ax.set_yticks(range(rows), teacher_names)
  ax.set_xlabel("student tap")
  ax.set_ylabel("teacher tap")
  if matrix.size <= MAX_ANNOTATED_CELLS:
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
              color="black" if value > 0.6 else "white")
  fig.colorbar(image, ax=ax, label="linear CKA")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def run(workdir: str, stage: str, *, examples: int = 500, out: str | None = None,
        name: str | None = None) -> dict:
  """Writes `<out>/<name>.png` and `.json` (default `out`: the workdir, `name`:
  `cka_<stage>`, `/` read as `_`); returns what the JSON holds plus both paths."""
  if examples < 2:
    raise ValueError(f"--examples={examples} must be at least 2 (CKA compares examples)")
  exp = workdir_experiment(workdir)
  teacher_stage = "validation/teacher" if stage.startswith("validation/") else "teacher"
  student_apply, student_vars = restore_stage(exp, workdir, stage)
  teacher_apply, teacher_vars = restore_stage(exp, workdir, teacher_stage)
  n = min(examples, len(exp.eval_source))
  batch = next(data.eval_batches(exp.eval_source, batch_size=n, mean=exp.info.mean,
                                 std=exp.info.std, prefetch=0))
  # Not jitted: jit would return the features sorted by name, not in layer order.
  teacher_taps = taps(teacher_apply(teacher_vars, batch["image"], train=False)[0])
  student_taps = taps(student_apply(student_vars, batch["image"], train=False)[0])
  matrix = cka_matrix(teacher_taps, student_taps)
  out = workdir if out is None else out
  base = os.path.join(out, name or f"cka_{stage.replace('/', '_')}")
  os.makedirs(out, exist_ok=True)
  c = exp.config
  result = {"workdir": os.path.abspath(workdir), "stage": stage, "teacher_stage": teacher_stage,
            "teacher": c.teacher.model, "student": c.student.model, "examples": n,
            "split": f"{c.data.name}:{c.data.eval_split}", "teacher_taps": list(teacher_taps),
            "student_taps": list(student_taps), "linear_cka": matrix.round(6).tolist()}
  checkpoint.atomic_write_json(f"{base}.json", result)
  save_heatmap(f"{base}.png", matrix, list(teacher_taps), list(student_taps),
               title=f"{c.teacher.model} → {c.student.model} ({stage})\n"
                     f"{n} images of {c.data.name}:{c.data.eval_split}")
  return {**result, "png": f"{base}.png", "json": f"{base}.json"}


def format_result(result: dict) -> str:
  """What the command prints: the matrix with the tap names, and the files written."""
  width = max(map(len, result["teacher_taps"]))
  lines = [f"linear CKA, teacher {result['teacher_stage']} (rows) vs {result['stage']} "
           f"(columns), {result['examples']} examples of {result['split']}",
           " " * width + "".join(f"{s:>12}" for s in result["student_taps"])]
  lines += [f"{name:<{width}}" + "".join(f"{v:>12.3f}" for v in row)
            for name, row in zip(result["teacher_taps"], result["linear_cka"])]
  return "\n".join(lines + [f"wrote {result['png']} and {result['json']}"])


def run_command(argv, compute: Callable[[], dict], report: Callable[[dict], str]) -> None:
  """An analysis command's `main`: prints `report(compute())`; a `ValueError` (a bad flag, a
  workdir or checkpoint that does not fit) exits with its one-line message instead."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  try:
    result = compute()
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(report(result))


def main(argv):
  f = flags.FLAGS
  run_command(argv, lambda: run(f.workdir, f.stage, examples=f.examples, out=f.out, name=f.name),
              format_result)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A finished KD job's workdir.", required=True)
  flags.DEFINE_string("stage", "student_kd", "The student stage compared with the teacher.")
  flags.DEFINE_integer("examples", 500, "Eval-split images the CKA is computed on.")
  flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
  flags.DEFINE_string("name", None, "Output file name without extension (default: cka_<stage>).")
  app.run(main)
