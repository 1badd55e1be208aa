"""Where distillation helps on digits, and by how much: four experiments, 3 seeds each.

    python benchmarks/digits_kd_experiments.py --experiment=headline  # the quick start's job
    python benchmarks/digits_kd_experiments.py --experiment=omitted   # Hinton's omitted class
    python benchmarks/digits_kd_experiments.py --experiment=labels    # 5 / 10 / 25% of labels
    python benchmarks/digits_kd_experiments.py --experiment=capacity  # student size, a PNG

Every figure is a command-line run of the KD job (`configs/digits_kd.py`). The job chooses each
student arm's recipe (shifts on/off, learning rate, epochs) on train[1000:] after training on
train[:1000] with a teacher of train[:1000]; this script only aggregates. `headline` also
prints each arm's validation grid (mean over seeds).
"""
import collections
import json
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_runs  # noqa: E402  (benchmarks/, the script's folder)
import results_log  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/digits_experiments", "Where runs are written.")
_EXPERIMENT = flags.DEFINE_enum("experiment", "headline",
                                ["headline", "omitted", "labels", "capacity"], "What to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_CLASSES = flags.DEFINE_list("classes", [str(c) for c in range(10)], "Omitted classes.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["4", "8", "20"], "KD temperatures (omitted).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.05", "0.1", "0.25"], "Labeled fractions.")
_PLOT = flags.DEFINE_string("plot", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "figures", "digits_capacity.png"),
                            "Where the capacity plot is written.")

# Student sizes of `capacity`: (label, pair, model_kwargs override).
STUDENTS = [("MLP 16", "mlp", "--config.student.model_kwargs.hidden_sizes=(16,)"),
            ("MLP 32", "mlp", "--config.student.model_kwargs.hidden_sizes=(32,)"),
            ("MLP 64", "mlp", "--config.student.model_kwargs.hidden_sizes=(64,)"),
            ("MLP 128", "mlp", "--config.student.model_kwargs.hidden_sizes=(128,)"),
            ("CNN 4/8", "cnn", "--config.student.model_kwargs.widths=(4, 8)"),
            ("CNN 8/16", "cnn", "--config.student.model_kwargs.widths=(8, 16)")]


def _dir(*parts) -> str:
  return os.path.join(_WORKDIR.value, *parts)


def _teacher(seed: int) -> str:
  """The headline run's teacher of `seed`, restored by the other experiments' runs."""
  return _dir("headline", f"seed{seed}", "teacher", "checkpoints")


def _by_stage(rows: list[dict]) -> dict[str, dict]:
  return {r["stage"]: r for r in rows}


def headline(seeds):
  acc, recipes, grid = collections.defaultdict(list), collections.defaultdict(list), {}
  for seed in seeds:
    workdir = _dir("headline", f"seed{seed}")
    rows = _by_stage(digits_runs.run_job(workdir, f"seed={seed}"))
    for stage, label in (("teacher", "teacher (CNN 32/64)"), ("student_baseline", "baseline MLP 64"),
                         ("student_kd", "KD MLP 64 (T=4, α=0.9)")):
      acc[label].append(rows[stage]["accuracy"])
      recipes[label].append(rows[stage]["recipe"])
    with open(os.path.join(workdir, "validation.json")) as f:
      for arm, scores in json.load(f)["accuracy"].items():
        for slug, value in scores.items():
          grid.setdefault(slug, collections.defaultdict(list))[arm].append(value)
  print(f"\ntest accuracy (497 test images):\n{digits_runs.markdown_table(acc, seeds, 'stage')}")
  print("\nrecipe of each row, per seed:")
  for label, values in recipes.items():
    print(f"- {label}: {values}")
  print("\nvalidation accuracy (train[1000:], trained on train[:1000]), mean ± std over seeds:")
  print("| recipe | baseline | KD |\n|---|---|---|")
  for slug, arms in grid.items():
    print(f"| {slug} | {digits_runs.mean_std(arms['student_baseline'])} | "
          f"{digits_runs.mean_std(arms['student_kd'])} |")


def omitted(seeds):
  overall, on_class, biases = (collections.defaultdict(list) for _ in range(3))
  for cls in map(int, _CLASSES.value):
    for seed in seeds:
      for k, temperature in enumerate(_TEMPERATURES.value):
        extra = [] if k == 0 else ["--config.student.baseline=False"]
        rows = digits_runs.run_job(_dir("omitted", f"class{cls}", f"seed{seed}", f"T{temperature}"),
                                   f"seed={seed},omit={cls},temperature={temperature}",
                                   f"--config.teacher.checkpoint={_teacher(seed)}", *extra)
        for r in rows:
          name = {"teacher": "teacher", "student_baseline": "CE only",
                  "student_baseline+bias": "CE only + bias"}.get(
                      r["stage"], r["stage"].replace("student_kd", f"KD T={temperature}"))
          if r["stage"].startswith("student_kd") or k == 0:
            overall[(cls, name)].append(r["accuracy"])
            on_class[(cls, name)].append(r["omitted_class_accuracy"])
            if "class_bias" in r:
              biases[(cls, name)].append(r["class_bias"])
  names = list(dict.fromkeys(name for _, name in overall))
  print("\nomitted class: test accuracy on that class / on all 497 test images "
        "(mean ± std over seeds; bias fitted on the train split)")
  print("| class | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
  for cls in map(int, _CLASSES.value):
    cells = [f"{digits_runs.mean_std(on_class[(cls, n)])} / {digits_runs.mean_std(overall[(cls, n)])}"
             + (f" (b={np.mean(biases[(cls, n)]):.1f})" if biases[(cls, n)] else "")
             for n in names]
    print(f"| {cls} | " + " | ".join(cells) + " |")
  # Mean over classes of the per-seed values (the seeds' spread of the class average).
  print("| mean | " + " | ".join(
      f"{digits_runs.mean_std(np.mean([on_class[(c, n)] for c in map(int, _CLASSES.value)], 0))} / "
      f"{digits_runs.mean_std(np.mean([overall[(c, n)] for c in map(int, _CLASSES.value)], 0))}"
      for n in names) + " |")


def labels(seeds):
  acc = collections.defaultdict(list)
  for fraction in _FRACTIONS.value:
    for seed in seeds:
      base = _dir("labels", f"f{fraction}", f"seed{seed}")
      small = ["--config.data.batch_size=16"]
      full = _by_stage(digits_runs.run_job(os.path.join(base, "teacher_full"),
                                           f"seed={seed},labels={fraction}", *small))
      same = _by_stage(digits_runs.run_job(os.path.join(base, "teacher_subset"),
                                           f"seed={seed},labels={fraction},teacher_subset",
                                           "--config.student.baseline=False", *small))
      pct = f"{100 * float(fraction):g}%"
      acc[f"{pct}: teacher on all labels"].append(full["teacher"]["accuracy"])
      acc[f"{pct}: teacher on the same {pct}"].append(same["teacher"]["accuracy"])
      acc[f"{pct}: CE only"].append(full["student_baseline"]["accuracy"])
      acc[f"{pct}: KD, teacher on all labels"].append(full["student_kd"]["accuracy"])
      acc[f"{pct}: KD, teacher on the same {pct}"].append(same["student_kd"]["accuracy"])
  print(f"\nlimited labels, test accuracy:\n{digits_runs.markdown_table(acc, seeds, 'run')}")


def capacity(seeds):
  acc, params = collections.defaultdict(list), {}
  for label, pair, override in STUDENTS:
    for seed in seeds:
      if label == "MLP 64":  # the headline's own run
        rows = digits_runs.run_job(_dir("headline", f"seed{seed}"), f"seed={seed}")
      else:
        rows = digits_runs.run_job(_dir("capacity", label.replace(" ", "").replace("/", "_"),
                                        f"seed{seed}"), f"seed={seed},pair={pair}",
                                   f"--config.teacher.checkpoint={_teacher(seed)}", override)
      rows = _by_stage(rows)
      acc[f"{label} baseline"].append(rows["student_baseline"]["accuracy"])
      acc[f"{label} KD"].append(rows["student_kd"]["accuracy"])
      params[label] = rows["student_kd"]["params"]
      acc["teacher"].append(rows["teacher"]["accuracy"])
  teacher = acc.pop("teacher")
  print(f"\ncapacity, test accuracy:\n{digits_runs.markdown_table(acc, seeds, 'student')}")
  print(f"params: {params}; teacher {digits_runs.mean_std(teacher)}")
  _plot(acc, params, teacher)


def _plot(acc, params, teacher):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for family, marker, color in (("MLP", "o", "tab:blue"), ("CNN", "s", "tab:orange")):
    labels_ = [label for label in params if label.startswith(family)]
    x = [params[label] for label in labels_]
    for arm, style in (("baseline", "--"), ("KD", "-")):
      y = np.array([acc[f"{label} {arm}"] for label in labels_]) * 100
      ax.errorbar(x, y.mean(1), yerr=y.std(1), marker=marker, color=color, ls=style, capsize=3,
                  mfc="white" if arm == "baseline" else color, label=f"{family} {arm}")
  ax.axhline(100 * np.mean(teacher), color="tab:red", ls="--", lw=1,
             label="teacher (CNN 32/64, 29k params)")
  ax.set_xscale("log")
  ax.set_xlabel("student parameters")
  ax.set_ylabel("digits test accuracy (%)")
  ax.set_title("Baseline vs KD by student size (each arm tuned on validation; 3 seeds)",
               fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(_PLOT.value)
  print(f"plot: {_PLOT.value}")


def main(_):
  seeds = _SEEDS.value
  for seed in seeds:  # the other experiments restore the headline's teachers
    if _EXPERIMENT.value != "headline" and not os.path.isdir(_teacher(seed)):
      digits_runs.run_job(_dir("headline", f"seed{seed}"), f"seed={seed}")
  experiments = {"headline": headline, "omitted": omitted, "labels": labels,
                 "capacity": capacity}
  experiments[_EXPERIMENT.value](seeds)


if __name__ == "__main__":
  with results_log.recorded(f"Digits KD experiments ({' '.join(sys.argv[1:])})"):
    app.run(main)
