"""Chooses the digits KD recipe on a validation split carved from train (never on test).

    python benchmarks/digits_kd_sweep.py --workdir=/tmp/digits_sweep

Trains on train[:1000], evaluates on train[1000:], for 3 seeds: the teacher and the
label-only baseline once per seed, then the KD student for each (temperature, alpha), whose
terms are (1 − alpha)·CE + alpha·KD(T) (`configs.common.kd_terms`). Prints the mean validation
accuracy of each setting.
"""
import ast
import itertools
import os
import sys

from absl import app, flags, logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common, digits_kd  # noqa: E402  pylint: disable=g-import-not-at-top
from kd_jax import kd_job  # noqa: E402  pylint: disable=g-import-not-at-top
import results_log  # noqa: E402  (benchmarks/, the script's folder)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/digits_sweep", "Where runs are written.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["2", "4", "8"], "KD temperatures.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.9"], "KD weights alpha (CE weighs 1 - alpha).")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Student epochs.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Config override KEY=PYTHON_LITERAL, e.g. student.model_kwargs.widths=(8,16).")


def main(_):
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("CI", "true")  # no progress bars
  acc = {}
  for seed in map(int, _SEEDS.value):
    base_dir = os.path.join(_WORKDIR.value, f"seed{seed}")
    config = digits_kd.get_config(f"validate,seed={seed}")
    with config.unlocked():
      config.student.num_epochs = _EPOCHS.value
      for item in _OVERRIDES.value:
        key, _, value = item.partition("=")
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
          node = node[group]
        node[leaf] = ast.literal_eval(value)
    rows = {r["stage"]: r["accuracy"] for r in kd_job.run(config, base_dir)}
    acc.setdefault("teacher", []).append(rows["teacher"])
    acc.setdefault("baseline", []).append(rows["student_baseline"])
    for t, a in itertools.product(map(float, _TEMPERATURES.value), map(float, _ALPHAS.value)):
      with config.unlocked():
        config.teacher.checkpoint = os.path.join(base_dir, "teacher", "checkpoints")
        config.student.baseline = False
        config.distill.terms = common.kd_terms(ce_weight=1.0 - a, kd_weight=a, temperature=t)
      rows = kd_job.run(config, os.path.join(base_dir, f"kd_T{t}_a{a}"))
      acc.setdefault(f"kd T={t} alpha={a}", []).append(rows[-1]["accuracy"])
      print(f"seed {seed} T={t} alpha={a}: {100 * rows[-1]['accuracy']:.2f}", flush=True)
  print(f"\nvalidation accuracy (train[1000:]), mean ± std over seeds {_SEEDS.value}, "
        f"student epochs {_EPOCHS.value}, overrides {_OVERRIDES.value}")
  for name, values in acc.items():
    print(f"{name:<24} {100 * np.mean(values):6.2f} ± {100 * np.std(values):.2f}   "
          f"{[round(100 * v, 2) for v in values]}")


if __name__ == "__main__":
  with results_log.recorded("Digits KD recipe sweep (validation split)"):
    app.run(main)
