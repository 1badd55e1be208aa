"""Digits test accuracy of each teacher–student regime against the student alone and classic
KD, 3 seeds.

    python benchmarks/digits_regimes_table.py --workdir=/tmp/digits_regimes

Every run is a command-line run: `python -m kd_jax.main
--config=configs/digits_regimes.py:regime=NAME,seed=S`. The student (MLP 64) and its recipe
(no shifts, lr 0.05, 30 epochs) are the same in every row; that recipe is the KD student's best
on validation (`digits_kd_experiments.py --experiment=headline`). "classic KD" is the KD job
(0.1·CE + 0.9·KD, T=4) with its recipe grid narrowed to that one recipe, distilling from the
headline's teacher of the same seed (`--teacher_root`).
"""
import collections
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_runs  # noqa: E402  (benchmarks/, the script's folder)
import results_log  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/digits_regimes", "Where runs are written.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_REGIMES = flags.DEFINE_list(
    "regimes", ["multi_teacher", "mtard", "mutual", "bdkd", "born_again", "uskd", "tgeo",
                "mean_teacher", "label_free"],
    "configs/digits_regimes.py entries, one or more rows each.")
_TEACHER_ROOT = flags.DEFINE_string(
    "teacher_root", "/tmp/digits_experiments/headline",
    "seed<S>/teacher/checkpoints under it: classic KD's teacher (trained here if missing).")

_FIXED_RECIPE = ("--config.tune.crop_padding=(0,)", "--config.tune.learning_rate=(0.05,)",
                 "--config.tune.num_epochs=(30,)")


def main(_):
  acc = collections.defaultdict(list)
  for seed in _SEEDS.value:
    teacher = os.path.join(_TEACHER_ROOT.value, f"seed{seed}", "teacher", "checkpoints")
    if not os.path.isdir(teacher):
      digits_runs.run_job(os.path.dirname(os.path.dirname(teacher)), f"seed={seed}")
    kd = {r["stage"]: r for r in digits_runs.run_job(
        os.path.join(_WORKDIR.value, "classic_kd", f"seed{seed}"), f"seed={seed}",
        f"--config.teacher.checkpoint={teacher}", *_FIXED_RECIPE)}
    acc["student alone (CE)"].append(kd["student_baseline"]["accuracy"])
    acc["classic KD (T=4, α=0.9)"].append(kd["student_kd"]["accuracy"])
    for regime in _REGIMES.value:
      rows = digits_runs.run_job(os.path.join(_WORKDIR.value, regime, f"seed{seed}"),
                                 f"regime={regime},seed={seed}",
                                 "--config.student.baseline=False", config="digits_regimes")
      for r in rows:
        acc[f"{regime}: {r['stage']} ({r['model']})"].append(r["accuracy"])
  print(f"\ndigits test accuracy (497 images), seeds {_SEEDS.value}:\n"
        f"{digits_runs.markdown_table(acc, _SEEDS.value, 'row')}")


if __name__ == "__main__":
  with results_log.recorded("Digits regimes table (test accuracy, 3 seeds)"):
    app.run(main)
