"""Digits test accuracy of KD students trained with different distillation terms, 3 seeds.

    python benchmarks/digits_terms_table.py --workdir=/tmp/digits_terms

Every row is a command-line run of the KD job (`python -m kd_jax.main`):
`--config=configs/digits_kd.py:pair=PAIR,terms=ROW,scale=SCALE,seed=S`, the terms built by
`configs/digits_kd.py` (CE plus each named loss with its taps and weight). Per seed the first
run trains the teacher and the label-only baseline; the other rows restore that teacher
(`--config.teacher.checkpoint`) and train only their student.

Nothing is chosen on the test set. On the validation split (train[:1000] / train[1000:], the
`validate` config, seeds `--tune_seeds`):
- `--select` compares the students of the `mlp` and `cnn` pairs (baseline and KD); the table
  uses the pair whose KD student scores higher;
- each row's weight scale (`scale=S`: the weights of its terms other than CE and KD, whose
  defaults follow RepDistiller's CIFAR-100 values, are multiplied by S) is picked from
  `--scales`, the best mean validation accuracy (ties go to the scale listed first); a row given
  as `terms@S` keeps the scale S chosen earlier, and with every row so given this step is skipped;
- in every test-phase run, the KD job itself picks each student arm's recipe (shifts, learning
  rate, epochs) on train[1000:] (configs/digits_kd.py `TUNE`).
"""
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_runs  # noqa: E402  (benchmarks/, the script's folder)
import results_log  # noqa: E402
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/digits_terms", "Where runs are written.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_PAIR = flags.DEFINE_string("pair", "", "Teacher → student pair; empty: chosen by --select.")
_SELECT = flags.DEFINE_list("select", ["mlp", "cnn"], "Pairs compared on validation.")
_TUNE_SEEDS = flags.DEFINE_list("tune_seeds", ["0"], "Seeds of the validation runs.")
_SCALES = flags.DEFINE_list("scales", ["1", "0.1", "0.01"], "Weight scales tried per row.")
_ROWS = flags.DEFINE_list(
    "rows", ["kd", "dkd", "fitnet+kd", "at+kd", "sp+kd", "rkd+kd", "crd+kd", "vid+kd",
             "reviewkd_hcl+kd"], "Term sets, one row each (the baseline row comes first).")


def _accuracies(pair: str, rows: list[str], split_arg: str, seeds: list[str],
                scales: dict[str, str] | None = None) -> dict[str, list[float]]:
  """Accuracy per row (key `row` or `row@scale`) over `seeds`; the first row also trains the
  teacher and the baseline, the others restore that teacher."""
  acc = {}
  for seed in map(int, seeds):
    base = os.path.join(_WORKDIR.value, f"{pair}{split_arg.replace(',', '_')}", f"seed{seed}")
    first = digits_runs.run_job(os.path.join(base, rows[0]), f"pair={pair},terms={rows[0]},seed={seed}{split_arg}")
    by_stage = {r["stage"]: r["accuracy"] for r in first}
    acc.setdefault("teacher", []).append(by_stage["teacher"])
    acc.setdefault("baseline (CE only)", []).append(by_stage["student_baseline"])
    acc.setdefault(rows[0], []).append(by_stage["student_kd"])
    teacher = os.path.join(base, rows[0], "teacher", "checkpoints")
    for row in rows[1:]:
      terms, _, scale = row.partition("@")
      scale = scale or (scales or {}).get(terms, "1")
      result = digits_runs.run_job(os.path.join(base, f"{terms}@{scale}"),
                    f"pair={pair},terms={terms},scale={scale},seed={seed}{split_arg}",
                    f"--config.teacher.checkpoint={teacher}", "--config.student.baseline=False")
      acc.setdefault(row if "@" in row else f"{row} (scale {scale})", []).append(
          result[-1]["accuracy"])
  return acc


def main(_):
  pair = _PAIR.value
  if not pair:
    scores = {}
    for candidate in _SELECT.value:
      acc = _accuracies(candidate, ["kd"], ",validate", _TUNE_SEEDS.value)
      print(f"\nvalidation (train[1000:]), pair={candidate}:\n{digits_runs.markdown_table(acc, _TUNE_SEEDS.value)}\n",
            flush=True)
      scores[candidate] = float(np.mean(acc["kd"]))
    pair = max(scores, key=scores.get)
    print(f"chosen on validation: pair={pair} (KD student validation accuracy "
          f"{ {k: round(100 * v, 2) for k, v in scores.items()} })\n", flush=True)
  scales = {}
  if not all("@" in row for row in _ROWS.value[1:]):  # `row@S`: S already chosen on validation
    tuned = [f"{row}@{scale}" for row in _ROWS.value[1:] for scale in _SCALES.value]
    acc = _accuracies(pair, _ROWS.value[:1] + tuned, ",validate", _TUNE_SEEDS.value)
    print(f"validation (train[1000:]), pair={pair}, weight scales:\n"
          f"{digits_runs.markdown_table(acc, _TUNE_SEEDS.value)}\n", flush=True)
    scales = {row: max(_SCALES.value, key=lambda scale: np.mean(acc[f"{row}@{scale}"]))
              for row in _ROWS.value[1:]}
    print(f"chosen scales: {scales}\n", flush=True)
  acc = _accuracies(pair, _ROWS.value, "", _SEEDS.value, scales)
  print(f"test accuracy (497 test images), pair={pair}, seeds {_SEEDS.value}:\n"
        f"{digits_runs.markdown_table(acc, _SEEDS.value)}")


if __name__ == "__main__":
  with results_log.recorded("Digits KD with distillation terms (test accuracy, 3 seeds)"):
    app.run(main)
