"""Does DisWOT's training-free score rank digits students as KD does? 3 seeds.

    PYTHONPATH=. python benchmarks/diswot_digits.py --workdir=/tmp/digits_experiments

For each seed: the KD test accuracy of the six students of `digits_kd_experiments.py
--experiment=capacity` (MLP 16/32/64/128, CNN 4/8 and 8/16; KD 0.1·CE + 0.9·KD, T=4, from the
CNN 32/64 teacher of the quick start, each recipe tuned on validation). These are the capacity
experiment's own runs: the same command-line KD jobs in the same workdirs, so a finished run is
restored, not retrained. Then each student's DisWOT score (`kd_jax.analysis.diswot`, mean over
`--inits` random initialisations) against that seed's trained teacher and against a random
teacher (the reference's setting), and the Spearman and Kendall (τ-b) rank correlations of each
score, of its two terms and of the parameter count with the KD accuracy: per seed (6 students)
and for the means over seeds.
"""
import collections
import os
import sys

from absl import app, flags
import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_kd_experiments as experiments  # noqa: E402  (its --workdir and --seeds flags)
import digits_runs  # noqa: E402
import results_log  # noqa: E402

sys.path.insert(0, digits_runs.ROOT)
from configs import digits_kd  # noqa: E402
from kd_jax.analysis import cka, diswot  # noqa: E402

_EXAMPLES = flags.DEFINE_integer("examples", 64, "Train images of DisWOT's batch.")
_INITS = flags.DEFINE_integer("inits", 5, "Random initialisations averaged per student.")
PROXIES = ("DisWOT, trained teacher", "DisWOT, random teacher", "semantic term (trained)",
           "relation term (trained)", "parameters")


def candidate(pair: str, override: str) -> str:
  """The DisWOT spec of a capacity student: `mlp` and `--config.student.model_kwargs.K=V`
  → `"mlp:K=V"`."""
  kwarg = override.removeprefix("--config.student.model_kwargs.")
  return f"{digits_kd.PAIRS[pair][2]}:{kwarg}"


def kd_accuracy(label: str, pair: str, override: str, seed: str) -> float:
  """The capacity experiment's KD test accuracy of one student (its run, restored if done)."""
  if label == "MLP 64":  # the headline's own run
    rows = digits_runs.run_job(experiments._dir("headline", f"seed{seed}"), f"seed={seed}")
  else:
    rows = digits_runs.run_job(
        experiments._dir("capacity", label.replace(" ", "").replace("/", "_"), f"seed{seed}"),
        f"seed={seed},pair={pair}", f"--config.teacher.checkpoint={experiments._teacher(seed)}",
        override)
  return next(r["accuracy"] for r in rows if r["stage"] == "student_kd")


def proxies(seed: str) -> dict[str, dict[str, float]]:
  """`{proxy: {student label: value}}` for one seed's teacher; higher predicts better."""
  workdir = experiments._dir("headline", f"seed{seed}")
  exp = cka.workdir_experiment(workdir)
  teacher = cka.restore_stage(exp, workdir, "teacher")
  students = {label: diswot.Candidate.parse(candidate(pair, override))
              for label, pair, override in experiments.STUDENTS}
  labels = {str(c): label for label, c in students.items()}
  values = collections.defaultdict(dict)
  for name, which in (("trained", teacher), ("random", None)):
    for row in diswot.rank(exp, which, list(students.values()), examples=_EXAMPLES.value,
                           seed=int(seed), inits=_INITS.value):
      label = labels[row["student"]]
      values[f"DisWOT, {name} teacher"][label] = row["score"]
      if name == "trained":
        values["semantic term (trained)"][label] = -row["semantic"]
        values["relation term (trained)"][label] = -row["relation"]
        values["parameters"][label] = row["params"]
  return values


def correlations(proxy: dict[str, float], accuracy: dict[str, float]) -> str:
  """`"ρ / τ"`: Spearman and Kendall τ-b of a proxy with the accuracy over the students."""
  x = [proxy[label] for label in accuracy]
  y = list(accuracy.values())
  return f"{stats.spearmanr(x, y).statistic:+.2f} / {stats.kendalltau(x, y).statistic:+.2f}"


def main(_):
  seeds = experiments._SEEDS.value
  accuracy, values = {}, {}
  for seed in seeds:
    # The headline run first: the other students distill from its teacher.
    digits_runs.run_job(experiments._dir("headline", f"seed{seed}"), f"seed={seed}")
    accuracy[seed] = {label: kd_accuracy(label, pair, override, seed)
                      for label, pair, override in experiments.STUDENTS}
    values[seed] = proxies(seed)
  labels = list(accuracy[seeds[0]])
  mean_accuracy = {label: np.mean([accuracy[s][label] for s in seeds]) for label in labels}
  mean = {proxy: {label: np.mean([values[s][proxy][label] for s in seeds]) for label in labels}
          for proxy in PROXIES}
  print(f"\nDisWOT on digits: one batch of {_EXAMPLES.value} train images, mean over "
        f"{_INITS.value} student initialisations; score = -(semantic + relation), higher "
        f"predicts better. Means over seeds {', '.join(seeds)} (rank in brackets).")
  print("| student | params | KD test acc | DisWOT, trained teacher | semantic | relation | "
        "DisWOT, random teacher |\n|---|---|---|---|---|---|---|")
  ranks = {name: {label: 1 + sorted(by_label, key=lambda k: -by_label[k]).index(label)
                  for label in labels}
           for name, by_label in (("acc", mean_accuracy), *mean.items())}

  def cell(proxy, label, sign=1):  # the distances are shown as distances (lower is better)
    return f"{sign * mean[proxy][label]:.4f} ({ranks[proxy][label]})"

  for label in labels:
    acc = digits_runs.mean_std([accuracy[s][label] for s in seeds])
    print(f"| {label} | {mean['parameters'][label]:,.0f} | {acc} ({ranks['acc'][label]}) | "
          f"{cell(PROXIES[0], label)} | {cell(PROXIES[2], label, -1)} | "
          f"{cell(PROXIES[3], label, -1)} | {cell(PROXIES[1], label)} |")
  print("\nrank correlation with the KD test accuracy over the 6 students, Spearman ρ / "
        "Kendall τ (per seed: that seed's teacher and runs; `means`: the means over seeds)")
  print("| proxy | " + " | ".join(f"seed {s}" for s in seeds) + " | means |\n|---|" +
        "---|" * (len(seeds) + 1))
  for proxy in PROXIES:
    print(f"| {proxy} | " + " | ".join(correlations(values[s][proxy], accuracy[s]) for s in seeds)
          + f" | {correlations(mean[proxy], mean_accuracy)} |")
  print("\nper seed, KD test acc / DisWOT score (trained teacher):")
  for label in labels:
    print(f"- {label}: " + "; ".join(
        f"{100 * accuracy[s][label]:.2f} / {values[s][PROXIES[0]][label]:+.4f}" for s in seeds))

if __name__ == "__main__":
  with results_log.recorded(f"DisWOT on digits ({' '.join(sys.argv[1:])})"):
    app.run(main)
